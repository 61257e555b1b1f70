"""HTTP/1.1 heads as a proxy rewrites them: hop-by-hop headers, forwarding headers, framing.

Plain functions over ``(name, value)`` byte pairs as httptools delivers them; header order and
repeated headers (``Set-Cookie``) are kept. RFC 9110 section 7.6.1 names the hop-by-hop
headers; ``Proxy-*`` and anything listed in ``Connection`` go too.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from http import HTTPStatus

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"te", b"trailer", b"transfer-encoding", b"upgrade"}
)
#: methods whose requests may be replayed on a fresh connection (RFC 9110 9.2.2)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100


@dataclass(slots=True)
class RequestHead:
    """A request head from a client, with what the proxy needs to know about it."""

    method: bytes
    target: bytes
    """origin-form path and query, as sent upstream"""
    version: str
    headers: Headers
    authority: bytes | None = None
    """absolute-form authority, else the Host header"""
    keep_alive: bool = True
    chunked: bool = False
    upgrade: bool = False
    expect_continue: bool = False
    has_body: bool = False
    request_id: bytes = b""
    drop: frozenset[bytes] = field(default_factory=frozenset)
    """lowercase names not forwarded: hop-by-hop and those listed in Connection"""


def _connection_tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def new_request_id() -> bytes:
    return str(uuid.UUID(bytes=os.urandom(16), version=4)).encode()


def parse_request_head(
    method: bytes, url: bytes, version: str, headers: Headers, keep_alive: bool
) -> RequestHead:
    """Classify a parsed request head. Raises ValueError for a target the proxy cannot serve."""
    authority: bytes | None = None
    if url.startswith(b"/"):
        target = url
    elif url[:7].lower() == b"http://":
        rest = url[7:]
        slash = rest.find(b"/")
        query = rest.find(b"?")
        cut = min(i for i in (slash, query, len(rest)) if i >= 0)
        authority, target = rest[:cut], rest[cut:] or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
        if not authority or b"@" in authority:
            raise ValueError("absolute-form target without a usable authority")
    elif url == b"*" and method == b"OPTIONS":
        target = url
    else:
        raise ValueError(f"request target {url[:64]!r} is not origin-form or http:// absolute-form")

    head = RequestHead(method, target, version, headers, authority, keep_alive)
    drop = set(HOP_BY_HOP)
    upgrade_header = connection_upgrade = False
    for name, value in headers:
        lname = name.lower()
        if lname == b"host":
            if head.authority is None:
                head.authority = value
        elif lname == b"transfer-encoding":
            head.chunked = True  # httptools accepts only a final "chunked"
            head.has_body = True
        elif lname == b"content-length":
            head.has_body = value.strip() != b"0"
        elif lname == b"connection":
            tokens = _connection_tokens(value)
            connection_upgrade = connection_upgrade or b"upgrade" in tokens
            drop |= tokens
        elif lname == b"upgrade":
            upgrade_header = upgrade_header or bool(value.strip())
        elif lname == b"expect":
            head.expect_continue = value.strip().lower() == b"100-continue"
        elif lname == b"x-request-id" and value:
            head.request_id = value
        elif lname.startswith(b"proxy-"):
            drop.add(lname)
    head.upgrade = upgrade_header and connection_upgrade  # as httptools decides it too
    if head.upgrade:
        drop -= {b"upgrade", b"connection"}
    head.drop = frozenset(drop)
    return head


def upstream_request(head: RequestHead, client_ip: bytes) -> bytes:
    """The head sent upstream: origin-form, HTTP/1.1, hop-by-hop removed, X-Forwarded-For
    appended, X-Forwarded-Proto set, X-Request-Id added when absent."""
    drop = head.drop
    out = [head.method, b" ", head.target, b" HTTP/1.1\r\n"]
    forwarded_for = b""
    seen_host = False
    for name, value in head.headers:
        lname = name.lower()
        if lname in drop:
            continue
        if lname == b"x-forwarded-for":
            forwarded_for = forwarded_for + b", " + value if forwarded_for else value
            continue
        if lname == b"x-forwarded-proto":
            continue
        if lname == b"host":
            if seen_host:
                continue
            seen_host = True
            if head.authority is not None:
                value = head.authority  # absolute-form wins over Host (RFC 9112 3.2.2)
        elif lname == b"connection" and head.upgrade:
            value = b"upgrade"
        out += (name, b": ", value, b"\r\n")
    if not seen_host and head.authority is not None:
        out += (b"host: ", head.authority, b"\r\n")
    if head.chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if not head.request_id:
        head.request_id = new_request_id()
        out += (b"x-request-id: ", head.request_id, b"\r\n")
    out += (
        b"x-forwarded-for: ",
        forwarded_for + b", " + client_ip if forwarded_for else client_ip,
        b"\r\nx-forwarded-proto: http\r\n\r\n",
    )
    return b"".join(out)


def reason_phrase(status: int, given: bytes) -> bytes:
    if given:
        return given
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def downstream_response(
    status: int,
    reason: bytes,
    headers: Headers,
    *,
    chunked: bool,
    keep_alive: bool,
    client_version: str,
    upgrade: bool = False,
) -> bytes:
    """The head sent to the client: hop-by-hop removed, our framing and Connection added."""
    drop = set(HOP_BY_HOP)
    for name, value in headers:
        lname = name.lower()
        if lname == b"connection":
            drop |= _connection_tokens(value)
        elif lname.startswith(b"proxy-"):
            drop.add(lname)
    if upgrade:
        drop -= {b"upgrade", b"connection"}
    out = [b"HTTP/1.1 %d " % status, reason, b"\r\n"]
    for name, value in headers:
        if name.lower() not in drop:
            out += (name, b": ", value, b"\r\n")
    if chunked:
        out.append(b"transfer-encoding: chunked\r\n")
    if not upgrade:
        if not keep_alive:
            out.append(b"connection: close\r\n")
        elif client_version == "1.0":
            out.append(b"connection: keep-alive\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
