"""HTTP/1.1 heads as a proxy rewrites them: hop-by-hop headers, forwarding headers, framing.

Plain functions over ``(name, value)`` byte pairs as httptools delivers them. Each head is
scanned once: the lines to forward are built in the same pass that classifies the head.
Header order and repeated headers (``Set-Cookie``) are kept. Hop-by-hop headers (RFC 9110
7.6.1), ``Proxy-*``, and anything listed in ``Connection`` are not forwarded; the proxy writes
its own framing (``Transfer-Encoding``) and ``Connection``.
"""

from __future__ import annotations

import email.utils
import itertools
import os
from dataclasses import dataclass, field
from http import HTTPStatus

from sidecar.clock import wall
from sidecar.http.framing import Framing, request_framing, response_framing

Headers = list[tuple[bytes, bytes]]

#: methods whose requests may be replayed on a fresh connection (RFC 9110 9.2.2)
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
MAX_HEAD_BYTES = 64 * 1024
MAX_HEADERS = 100
#: Connection tokens that are not taken as header names to drop: the plain options, and the
#: headers that frame or identify a message (a client listing Content-Length there would
#: otherwise have its body forwarded without framing: a request smuggled to the upstream)
_KEPT_TOKENS = frozenset(
    {
        b"keep-alive",
        b"close",
        b"upgrade",
        b"content-length",
        b"transfer-encoding",
        b"host",
        b"x-request-id",
    }
)

# What the single pass does with each special header (lowercase name -> action).
_HOST, _TE, _CL, _CONN, _UPGRADE, _EXPECT, _RID, _XFF, _DROP = range(9)
_DEADLINE, _TIMEOUT, _ATTEMPT, _RETRY = range(9, 13)
_REQUEST = {
    b"x-meshlet-deadline-ms": _DEADLINE,
    b"x-meshlet-timeout-ms": _TIMEOUT,
    b"x-meshlet-attempt": _ATTEMPT,
    b"x-meshlet-retry": _RETRY,
    b"host": _HOST,
    b"transfer-encoding": _TE,
    b"content-length": _CL,
    b"connection": _CONN,
    b"upgrade": _UPGRADE,
    b"expect": _EXPECT,
    b"x-request-id": _RID,
    b"x-forwarded-for": _XFF,
    b"x-forwarded-proto": _DROP,
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
}
_RESPONSE = {
    b"transfer-encoding": _TE,
    b"content-length": _CL,
    b"connection": _CONN,
    b"upgrade": _UPGRADE,
    b"keep-alive": _DROP,
    b"te": _DROP,
    b"trailer": _DROP,
}


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def _codings(value: bytes) -> list[bytes]:
    return [c.strip() for c in value.split(b",") if c.strip()]


def _without(lines: list[bytes], names: set[bytes]) -> list[bytes]:
    """``lines`` (4 items per header) without the headers called ``names``."""
    kept: list[bytes] = []
    for i in range(0, len(lines), 4):
        if lines[i].lower() not in names:
            kept += lines[i : i + 4]
    return kept


_ID_PREFIX = os.urandom(8).hex()
_ID_PREFIX = f"{_ID_PREFIX[:8]}-{_ID_PREFIX[8:12]}-{_ID_PREFIX[12:16]}"
_id_counter = itertools.count(int.from_bytes(os.urandom(6), "big"))


def new_request_id() -> bytes:
    """A UUID-shaped id: 64 random bits per process, then a counter (cheaper than uuid4)."""
    n = next(_id_counter)
    return f"{_ID_PREFIX}-{(n >> 48) & 0xFFFF:04x}-{n & 0xFFFFFFFFFFFF:012x}".encode()


def head_size(headers: Headers) -> int:
    """Bytes the header lines took on the wire (name, ": ", value, CRLF)."""
    return sum(len(name) + len(value) + 4 for name, value in headers)


# -- requests ---------------------------------------------------------------------------------


@dataclass(slots=True)
class RequestHead:
    """A client's request head, classified, with its header lines ready to forward."""

    method: bytes
    target: bytes
    """origin-form path and query, as sent upstream"""
    version: str
    keep_alive: bool
    authority: bytes | None = None
    """absolute-form authority, else the Host header"""
    chunked: bool = False
    upgrade: bool = False
    expect_continue: bool = False
    has_body: bool = False
    content_length: int = -1
    """the ``Content-Length`` (-1: none)"""
    request_id: bytes = b""
    codings: bytes = b""
    """transfer codings before the final chunked (kept when the body is re-chunked)"""
    forwarded_for: bytes = b""
    upgrade_value: bytes = b""
    deadline_ms: int | None = None
    """``x-meshlet-deadline-ms``: what an earlier hop left of its deadline"""
    timeout_ms: int | None = None
    """``x-meshlet-timeout-ms``: the caller's own shorter timeout"""
    attempt: int = 0
    """``x-meshlet-attempt``: the try of an earlier hop that retries (0: none)"""
    retry: bool = False
    """``x-meshlet-retry: on``: retry even a method that is not idempotent"""
    lines: list[bytes] = field(default_factory=list)
    """forwardable headers, four items each: name, b": ", value, b"\\r\\n\""""


def split_target(method: bytes, url: bytes) -> tuple[bytes, bytes | None]:
    """(origin-form target, authority of an absolute-form URL). ValueError when unusable."""
    if url.startswith(b"/"):
        return url, None
    if url[:7].lower() == b"http://":
        rest = url[7:]
        cut = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < cut:
                cut = i
        authority, target = rest[:cut], rest[cut:] or b"/"
        if target.startswith(b"?"):
            target = b"/" + target
        if not authority or b"@" in authority:
            raise ValueError("absolute-form target without a usable authority")
        return target, authority
    if url == b"*" and method == b"OPTIONS":
        return url, None
    raise ValueError(f"request target {url[:64]!r} is not origin-form or http:// absolute-form")


def parse_request_head(
    method: bytes, url: bytes, version: str, headers: Headers, keep_alive: bool
) -> RequestHead:
    """Classify a request head and build its forwardable lines in one pass; ValueError for
    a head no proxy should forward (an unusable target, two Host headers)."""
    target, authority = split_target(method, url)
    head = RequestHead(method, target, version, keep_alive, authority)
    lines = head.lines
    custom: set[bytes] | None = None
    te_tokens: list[bytes] = []
    connection_upgrade = seen_host = False
    for name, value in headers:
        lname = name.lower()
        action = _REQUEST.get(lname)
        if action is None:
            if lname[:6] != b"proxy-":
                lines += (name, b": ", value, b"\r\n")
        elif action == _HOST:
            if seen_host:  # which one the upstream would take is anybody's guess
                raise ValueError("more than one Host header")
            seen_host = True
            if authority is None:
                head.authority = value
            lines += (name, b": ", head.authority or value, b"\r\n")
        elif action == _CL:
            if not value.strip().isdigit():  # (llhttp lets only digits through)
                raise ValueError(f"Content-Length {value[:20]!r} is not a number")
            head.content_length = int(value)
            lines += (name, b": ", value, b"\r\n")
        elif action == _TE:
            head.chunked = True  # httptools accepts only a final "chunked"
            te_tokens += _codings(value)
        elif action == _CONN:
            tokens = _tokens(value)
            connection_upgrade = connection_upgrade or b"upgrade" in tokens
            extra = tokens - _KEPT_TOKENS
            if extra:
                custom = extra if custom is None else custom | extra
        elif action == _UPGRADE:
            head.upgrade_value = value.strip()
        elif action == _EXPECT:
            head.expect_continue = value.strip().lower() == b"100-continue"
            lines += (name, b": ", value, b"\r\n")
        elif action == _RID:
            if value and not head.request_id:
                head.request_id = value
            lines += (name, b": ", value, b"\r\n")
        elif action == _XFF:
            head.forwarded_for = head.forwarded_for + b", " + value if head.forwarded_for else value
        elif action >= _DEADLINE:  # the mesh's own: read, never forwarded as sent
            _mesh_header(head, action, value.strip())
    if te_tokens:
        head.codings = b", ".join(te_tokens[:-1])
    head.has_body = request_framing(head.chunked, head.content_length) is not Framing.EMPTY
    if custom:
        head.lines = _without(lines, custom)
    if not seen_host and authority is not None:
        head.lines += (b"host", b": ", authority, b"\r\n")
    head.upgrade = connection_upgrade and bool(head.upgrade_value)  # as httptools decides
    return head


def _mesh_header(head: RequestHead, action: int, value: bytes) -> None:
    """A malformed value is ignored (as Envoy ignores a bad x-envoy-upstream-rq-timeout-ms)."""
    if action == _RETRY:
        head.retry = value.lower() == b"on"
    elif value.isdigit() and len(value) <= 10:
        number = int(value)
        if action == _DEADLINE:
            head.deadline_ms = number
        elif action == _TIMEOUT:
            head.timeout_ms = number or None
        else:
            head.attempt = number


def upstream_request(
    head: RequestHead, client_ip: bytes, attempt: int = 0, deadline_ms: int | None = None
) -> bytes:
    """The head sent upstream: origin-form, HTTP/1.1, hop-by-hop removed, X-Forwarded-For
    appended, X-Forwarded-Proto set, X-Request-Id added when absent; which try this is and
    the milliseconds left (``x-meshlet-attempt``, ``x-meshlet-deadline-ms``) when given."""
    tail = [b"x-forwarded-for: "]
    if head.forwarded_for:
        tail += (head.forwarded_for, b", ")
    tail += (client_ip, b"\r\nx-forwarded-proto: http\r\n")
    if not head.request_id:
        head.request_id = new_request_id()
        tail += (b"x-request-id: ", head.request_id, b"\r\n")
    if head.chunked:
        if head.codings:
            tail += (b"transfer-encoding: ", head.codings, b", chunked\r\n")
        else:
            tail.append(b"transfer-encoding: chunked\r\n")
    if head.upgrade:
        tail += (b"connection: upgrade\r\nupgrade: ", head.upgrade_value, b"\r\n")
    if attempt:
        tail += (b"x-meshlet-attempt: ", b"%d" % attempt, b"\r\n")
    if deadline_ms is not None:
        tail += (b"x-meshlet-deadline-ms: ", b"%d" % deadline_ms, b"\r\n")
    tail.append(b"\r\n")
    return b"".join((head.method, b" ", head.target, b" HTTP/1.1\r\n", *head.lines, *tail))


# -- responses --------------------------------------------------------------------------------


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    lines: list[bytes]
    """forwardable headers, four items each"""
    chunked: bool = False
    """the final transfer coding is chunked"""
    codings: bytes = b""
    """transfer codings other than a final chunked (a read-until-close body), kept"""
    sized: bool = False
    """has a Content-Length"""
    close: bool = False
    """the upstream closes the connection after it"""
    upgrade_value: bytes = b""
    framing: Framing = Framing.EMPTY
    """where its body ends, as the upstream sends it (``framing.response_framing``; the
    answer to a HEAD request has none, whatever this says)"""


def parse_response_head(status: int, reason: bytes, headers: Headers) -> ResponseHead:
    lines: list[bytes] = []
    resp = ResponseHead(status, reason, lines)
    custom: set[bytes] | None = None
    te_tokens: list[bytes] = []
    for name, value in headers:
        lname = name.lower()
        action = _RESPONSE.get(lname)
        if action is None:
            if lname[:6] != b"proxy-":
                lines += (name, b": ", value, b"\r\n")
        elif action == _CL:
            resp.sized = True
            lines += (name, b": ", value, b"\r\n")
        elif action == _TE:
            te_tokens += _codings(value)
        elif action == _CONN:
            tokens = _tokens(value)
            resp.close = resp.close or b"close" in tokens
            extra = tokens - _KEPT_TOKENS
            if extra:
                custom = extra if custom is None else custom | extra
        elif action == _UPGRADE:
            resp.upgrade_value = value.strip()
    if te_tokens:
        resp.chunked = te_tokens[-1].lower() == b"chunked"
        resp.codings = b", ".join(te_tokens[:-1] if resp.chunked else te_tokens)
    if custom:
        resp.lines = _without(lines, custom)
    coded = resp.chunked or bool(resp.codings)
    resp.framing = response_framing(
        status, head_request=False, coded=coded, chunked=resp.chunked, sized=resp.sized
    )
    return resp


def retry_after(resp: ResponseHead) -> float | None:
    """Seconds a ``Retry-After`` asks for (delay-seconds or an HTTP date), or None."""
    lines = resp.lines
    for i in range(0, len(lines), 4):
        if lines[i].lower() == b"retry-after":
            value = lines[i + 2].strip().decode("latin-1")
            if value.isdigit():
                return float(value)
            try:
                when = email.utils.parsedate_to_datetime(value)
            except (TypeError, ValueError):
                return None
            return max(0.0, when.timestamp() - wall())
    return None


def reason_phrase(status: int, given: bytes) -> bytes:
    if given:
        return given
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def downstream_response(
    resp: ResponseHead, *, chunked: bool, keep_alive: bool, client_version: str
) -> bytes:
    """The head sent to the client, with our framing and Connection."""
    if chunked:
        codings = resp.codings + b", chunked" if resp.codings else b"chunked"
        end = b"transfer-encoding: " + codings + b"\r\n"
    elif resp.codings:
        end = b"transfer-encoding: " + resp.codings + b"\r\n"
    else:
        end = b""
    if not keep_alive:
        end += b"connection: close\r\n\r\n"
    elif client_version == "1.0":
        end += b"connection: keep-alive\r\n\r\n"
    else:
        end += b"\r\n"
    status_line = b"HTTP/1.1 %d %s\r\n" % (resp.status, reason_phrase(resp.status, resp.reason))
    return b"".join((status_line, *resp.lines, end))


def interim_response(resp: ResponseHead) -> bytes:
    """A 1xx head as is (101 keeps its Upgrade and Connection: upgrade)."""
    end = (
        b"connection: upgrade\r\nupgrade: " + resp.upgrade_value + b"\r\n\r\n"
        if resp.status == 101
        else b"\r\n"
    )
    status_line = b"HTTP/1.1 %d %s\r\n" % (resp.status, reason_phrase(resp.status, resp.reason))
    return b"".join((status_line, *resp.lines, end))


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
