"""The little HTTP/1.1 the sidecar speaks as a client: the app's health check, the control
plane's WebSocket upgrade (``websocket``), and the lock calls it forwards to the control plane
(``request``). Not the proxy's codec: one request per connection; a health check reads only
a response's head, an upgrade its headers, a lock call a small body of known length.

``parse_head`` is plain code; ``connect``, ``read_head``, ``get_status`` and ``request`` do
the I/O on asyncio streams. Their time limits are the caller's ``asyncio.timeout`` scope.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Final
from urllib.parse import SplitResult, urlsplit

from sidecar.errors import ConnectError, PeerError

MAX_HEAD: Final = 64 * 1024
"""bytes: a longer response head is refused"""
MAX_BODY: Final = 64 * 1024
"""bytes: a longer response body is refused (``request``)"""
USER_AGENT: Final = "meshlet-sidecar"


@dataclass(frozen=True, slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: dict[str, str]
    """lower-case names; a repeated header's values joined with ", " (RFC 9110 5.3)"""


@dataclass(frozen=True, slots=True)
class Target:
    """Where a URL points: ``host``, ``port``, the ``Host`` header and the request target."""

    host: str
    port: int
    authority: str
    path: str
    secure: bool

    @classmethod
    def of(cls, url: str) -> Target:
        parts = urlsplit(url)
        secure = parts.scheme in ("https", "wss")
        if parts.scheme not in ("http", "https", "ws", "wss") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s):// or ws(s):// URL")
        port = parts.port or (443 if secure else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.hostname, port, _authority(parts), path, secure)


def _authority(parts: SplitResult) -> str:
    return parts.netloc.rpartition("@")[2]


def request_head(method: str, target: Target, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {target.path} HTTP/1.1", f"Host: {target.authority}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def parse_head(raw: bytes) -> ResponseHead:
    """A response head, status line to the blank line. Raises PeerError if it is not HTTP/1."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise PeerError(f"not an HTTP/1.1 answer: {lines[0][:80]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise PeerError(f"a malformed header line in the answer: {line[:80]!r}")
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return ResponseHead(int(code), reason, headers)


async def connect(
    target: Target, tls: ssl.SSLContext | None, address: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to ``target`` (TLS with ``tls``, or the system's trust store, for https
    and wss), at ``address`` if given (one the host name resolved to: the certificate is
    still checked against the name). A refused or unreachable server raises ConnectError; an
    untrusted certificate raises ssl.SSLCertVerificationError as it is."""
    context = (tls or ssl.create_default_context()) if target.secure else None
    try:
        return await asyncio.open_connection(
            address or target.host,
            target.port,
            ssl=context,
            server_hostname=target.host if context else None,
            limit=MAX_HEAD,
        )
    except ssl.SSLCertVerificationError:
        raise
    except OSError as e:
        at = f" at {address}" if address and address != target.host else ""
        where = f"{target.host}:{target.port}{at}"
        raise ConnectError(where, e.strerror or str(e)) from e


async def read_head(reader: asyncio.StreamReader) -> ResponseHead:
    """The next response head; the bytes after it stay in ``reader``."""
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        said = f" after {len(e.partial)} bytes" if e.partial else ""
        raise PeerError(f"the connection closed before a whole answer{said}") from None
    except asyncio.LimitOverrunError:
        raise PeerError(f"an answer's head over {MAX_HEAD} bytes") from None
    return parse_head(raw[:-4])


async def get_status(url: str, tls: ssl.SSLContext | None = None) -> int:
    """``GET url``'s status (a 1xx interim answer is skipped); the body is not read."""
    target = Target.of(url)
    reader, writer = await connect(target, tls)
    try:
        headers = {"User-Agent": USER_AGENT, "Connection": "close"}
        writer.write(request_head("GET", target, headers))
        head = await read_head(reader)
        while 100 <= head.status < 200:
            head = await read_head(reader)
        return head.status
    finally:
        writer.close()


async def read_body(reader: asyncio.StreamReader, head: ResponseHead, limit: int) -> bytes:
    """The body after ``head``: ``Content-Length`` bytes, or up to the end of the connection;
    PeerError when it is chunked, longer than ``limit``, or cut short."""
    if "transfer-encoding" in head.headers:
        raise PeerError("a chunked answer (only a Content-Length body is read)")
    length = head.headers.get("content-length")
    try:
        if length is None:
            body = await reader.read(limit + 1)
            while body and len(body) <= limit and (more := await reader.read(limit + 1)):
                body += more
        elif not (length.isascii() and length.isdigit()):
            raise PeerError(f"a malformed Content-Length: {length[:20]!r}")
        elif int(length) > limit:
            raise PeerError(f"an answer's body of {length} bytes, over {limit}")
        else:
            body = await reader.readexactly(int(length))
    except asyncio.IncompleteReadError as e:
        raise PeerError(f"the connection closed {len(e.partial)} bytes into the body") from None
    if len(body) > limit:
        raise PeerError(f"an answer's body over {limit} bytes")
    return body


async def request(
    method: str,
    url: str,
    body: bytes,
    headers: dict[str, str],
    tls: ssl.SSLContext | None = None,
    address: str = "",
) -> tuple[ResponseHead, bytes]:
    """Send ``method url`` with a JSON ``body`` (to ``address`` if given: ``connect``); the
    answer's head and body (at most ``MAX_BODY`` bytes). ConnectError: nothing was sent."""
    target = Target.of(url)
    reader, writer = await connect(target, tls, address)
    try:
        sent = {
            "User-Agent": USER_AGENT,
            "Connection": "close",
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            **headers,
        }
        writer.write(request_head(method, target, sent) + body)
        head = await read_head(reader)
        while 100 <= head.status < 200:
            head = await read_head(reader)
        return head, await read_body(reader, head, MAX_BODY)
    finally:
        writer.close()
