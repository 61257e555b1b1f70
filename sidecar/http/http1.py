"""HTTP/1.1 heads as a proxy rewrites them: hop-by-hop headers, forwarding headers, framing.

Plain functions over ``(name, value)`` byte pairs as httptools delivers them. Each head is
scanned once: the lines to forward (``name: value\r\n``, one bytes each) are built in the same
pass that classifies the head.
Header order and repeated headers (``Set-Cookie``) are kept. Hop-by-hop headers (RFC 9110
7.6.1), ``Proxy-*``, and anything listed in ``Connection`` are not forwarded; the proxy writes
its own framing (``Transfer-Encoding``) and ``Connection``.
"""

from __future__ import annotations

import os
import re
import time
from http import HTTPStatus
from typing import Final

from sidecar.clock import wall
from sidecar.http import framing, grpctimeout
from sidecar.http.framing import response_framing
from sidecar.http.headers import (
    ATTEMPT,
    CL,
    CONN,
    DEADLINE,
    DROP,
    EXPECT,
    FORWARD,
    GRPC_TIMEOUT,
    HOST,
    KEPT_TOKENS,
    REQUEST,
    RESPONSE,
    RETRY,
    RID,
    TE,
    TIMEOUT,
    UPGRADE,
    XFF,
    action_of,
    connection_tokens,
    split_codings,
    without,
)

Headers = list[tuple[bytes, bytes]]

# ``RequestHead.add`` tells the headers a request does not forward as they came (XFF, the
# dropped ones, the mesh's own) from the rest by one comparison, and the mesh's numbers from
# the rest of its own by another
assert max(HOST, TE, CL, CONN, UPGRADE, EXPECT, RID) < XFF < DROP < DEADLINE
assert max(DEADLINE, TIMEOUT, ATTEMPT) < RETRY < GRPC_TIMEOUT

#: what a request that came over HTTP/2 has for its version (``http2.request_head``; the
#: access log's, never sent): here, so that asking needs no HTTP/2 code loaded
HTTP2_VERSION: Final = "2"
#: methods whose requests may be replayed on a fresh connection (RFC 9110 9.2.2)
IDEMPOTENT: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"})
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_HEADERS: Final = 100


class RequestIds:
    """UUID-shaped request ids: 80 random bits per process, then a 48-bit counter from a
    random start below 2**40 (12 hex digits for the next 2**48 - 2**40 requests).

    The counter's last two hex digits come from a table, the ten before them are formatted
    once per 256 ids: an id costs one concatenation (a ``%``-format of the whole counter per
    id cost 2.2k instructions, 3 % of a compiled sidecar's work per request)."""

    __slots__ = ("_base", "_format", "_next")

    def __init__(self, random: bytes, start: int) -> None:
        hexed = random.hex()
        prefix = f"{hexed[:8]}-{hexed[8:12]}-{hexed[12:16]}-{hexed[16:20]}-"
        #: the id's prefix and the counter's first ten hex digits
        self._format = prefix.encode() + b"%010x"
        self._next = start
        self._base = self._format % (start >> 8)

    def __repr__(self) -> str:
        return f"<RequestIds next {self._next:#x}>"

    def new(self) -> bytes:
        n = self._next
        self._next = n + 1
        low = n & 0xFF
        if low == 0:  # (a new block of 256: its first ten hex digits)
            self._base = self._format % (n >> 8)
        return self._base + _LOW_DIGITS[low]


#: the counter's last two hex digits, by its lowest byte
_LOW_DIGITS: Final = [b"%02x" % n for n in range(256)]
_REQUEST_IDS: Final = RequestIds(os.urandom(10), int.from_bytes(os.urandom(5), "big"))


def new_request_id() -> bytes:
    """A UUID-shaped id, unique in this process (``RequestIds``)."""
    return _REQUEST_IDS.new()


# -- requests ---------------------------------------------------------------------------------


class HeadLines:
    """What request and response heads read alike: the lines forwarded as they came, those
    read but not forwarded (counted, for the limits, by each ``add``), the transfer codings,
    and the names ``Connection`` lists. (Subclasses set these fields in their own
    ``__init__``: one call fewer a head.)"""

    __slots__ = ("_custom", "_te", "lines", "unlisted", "unlisted_bytes", "upgrade_value")

    lines: list[bytes]
    """forwardable header lines, ``name: value\\r\\n`` each (a response head read whole,
    ``wholehead``, has them all in one item)"""
    unlisted: int
    """header lines read but not forwarded as they came (for the limits, with ``lines``)"""
    unlisted_bytes: int
    """their bytes on the wire (name, ": ", value, CRLF)"""
    upgrade_value: bytes
    _te: list[bytes] | None
    _custom: frozenset[bytes] | None

    def _hop_by_hop(self, action: int, value: bytes) -> frozenset[bytes] | None:
        """Transfer-Encoding, Upgrade and Connection read (Connection's tokens returned, for
        the caller to look at)."""
        if action == TE:
            codings = split_codings(value)
            self._te = codings if self._te is None else self._te + codings
        elif action == CONN:
            tokens = connection_tokens(value)
            if not tokens <= KEPT_TOKENS:  # names to drop (the test allocates no set)
                extra = tokens - KEPT_TOKENS
                self._custom = extra if self._custom is None else self._custom | extra
            return tokens
        elif action == UPGRADE:
            self.upgrade_value = value.strip()
        return None


class RequestHead(HeadLines):
    """A client's request head, classified, with its header lines ready to forward.

    (A plain class, not a dataclass: compiled, a dataclass's ``__init__`` stays Python.)"""

    __slots__ = (
        "_connection_upgrade",
        "_host_seen",
        "attempt",
        "authority",
        "chunked",
        "codings",
        "content_length",
        "deadline_ms",
        "expect_continue",
        "forwarded_for",
        "grpc",
        "grpc_timeout_ms",
        "has_body",
        "keep_alive",
        "method",
        "proxied",
        "request_id",
        "retry",
        "target",
        "timeout_ms",
        "upgrade",
        "version",
    )

    def __init__(
        self, method: bytes, target: bytes, version: str, authority: bytes | None = None
    ) -> None:
        self.method = method
        #: origin-form path and query, as sent upstream
        self.target = target
        self.version = version
        #: (from ``complete``)
        self.keep_alive = True
        #: absolute-form authority, else the Host header
        self.authority = authority
        #: absolute-form: sent to a proxy (``http_proxy``), for the host it names
        self.proxied = authority is not None
        self.chunked = False
        self.upgrade = False
        self.expect_continue = False
        self.has_body = False
        #: the ``Content-Length`` (-1: none)
        self.content_length = -1
        self.request_id = b""
        #: transfer codings before the final chunked (kept when the body is re-chunked)
        self.codings = b""
        self.forwarded_for = b""
        self.upgrade_value = b""
        #: ``x-meshlet-deadline-ms``: what an earlier hop left of its deadline
        self.deadline_ms: int | None = None
        #: ``x-meshlet-timeout-ms``: the caller's own shorter timeout
        self.timeout_ms: int | None = None
        #: ``x-meshlet-attempt``: the try of an earlier hop that retries (0: none)
        self.attempt = 0
        #: ``x-meshlet-retry: on``: retry even a method that is not idempotent
        self.retry = False
        #: ``grpc-timeout``, in milliseconds: a gRPC caller's deadline (None: none, or malformed)
        self.grpc_timeout_ms: int | None = None
        #: a gRPC call (``application/grpc*`` over HTTP/2, ``http2.request_head``)
        self.grpc = False
        self.lines = []
        self.unlisted = self.unlisted_bytes = 0
        # what the lines decide only together, until ``complete``
        self._te = None
        self._custom = None
        self._connection_upgrade = False
        self._host_seen = False

    def __repr__(self) -> str:
        target = self.target[:40].decode(errors="replace")
        return f"<RequestHead {self.method.decode()} {target} [{len(self.lines)} headers]>"

    def add(self, name: bytes, value: bytes) -> None:
        """One header line, as it came: read, and forwarded or dropped. ValueError for a
        line no proxy should forward (a second Host, a Content-Length that is no number)."""
        # ``action_of``, its common case inline (through a local: CPython 3.11 binds a method
        # of an imported name anew at each call)
        actions = REQUEST
        action = actions.get(name, -1)
        if action < 0:
            action = action_of(actions, name)
        if action == FORWARD:
            self.lines.append(b"%s: %s\r\n" % (name, value))
            return
        if action >= XFF:  # read, or dropped: not among the lines (counted, for the limits)
            self.unlisted += 1
            self.unlisted_bytes += len(name) + len(value) + 4
            if action == DROP:
                return
            if action == XFF:
                xff = self.forwarded_for
                self.forwarded_for = xff + b", " + value if xff else value
            elif action >= RETRY:  # the mesh's own: read, never forwarded as sent
                _mesh_header(self, action, value.strip())
            else:  # the mesh's numbers: a request of the mesh has two (a malformed one is
                # ignored, as Envoy ignores a bad x-envoy-upstream-rq-timeout-ms)
                value = value.strip()
                if value.isdigit() and len(value) <= 10:
                    number = int(value)
                    if action == DEADLINE:
                        self.deadline_ms = number
                    elif action == ATTEMPT:
                        self.attempt = number
                    else:
                        self.timeout_ms = number or None
            return
        if action == HOST:
            if self._host_seen:  # which one the upstream would take is anybody's guess
                raise ValueError("more than one Host header")
            self._host_seen = True
            if self.authority is None:
                self.authority = value
            self.lines.append(b"%s: %s\r\n" % (name, self.authority or value))
        elif action == RID:
            if value and not self.request_id:
                self.request_id = value
            self.lines.append(b"%s: %s\r\n" % (name, value))
        elif action == CL:
            if not value.strip().isdigit():  # (llhttp lets only digits through)
                raise ValueError(f"Content-Length {value[:20]!r} is not a number")
            self.content_length = int(value)
            self.lines.append(b"%s: %s\r\n" % (name, value))
        elif action == EXPECT:
            self.expect_continue = value.strip().lower() == b"100-continue"
            self.lines.append(b"%s: %s\r\n" % (name, value))
        else:  # Transfer-Encoding, Connection, Upgrade: read, not among the lines
            self.unlisted += 1
            self.unlisted_bytes += len(name) + len(value) + 4
            tokens = self._hop_by_hop(action, value)
            if tokens is not None:
                self._connection_upgrade = self._connection_upgrade or b"upgrade" in tokens
            elif action == TE:
                self.chunked = True  # httptools accepts only a final "chunked"

    def mesh_tail(self, tail: re.Match[bytes]) -> None:
        """The mesh's lines that ended the head (``cut_mesh_tail``), read as ``add`` reads
        them: each counted for the limits, all but x-request-id's among the unlisted."""
        line, request_id, forwarded, attempt, deadline = tail.groups()
        start, end = tail.span()
        size = end - 4 - start  # (each line's CRLF before it, the blank line's after them)
        xff = self.forwarded_for
        self.forwarded_for = xff + b", " + forwarded if xff else forwarded
        if request_id is not None:
            if not self.request_id:
                self.request_id = request_id
            self.lines.append(line)
            size -= len(line)
        self.attempt = int(attempt)
        self.deadline_ms = int(deadline)
        self.unlisted += 4
        self.unlisted_bytes += size

    def complete(self, keep_alive: bool) -> None:
        """The last header line came: what the lines decide together."""
        self.keep_alive = keep_alive
        if self._te:
            self.codings = b", ".join(self._te[:-1])
        # (``request_framing(...) is not EMPTY``, inline: a call costs more, once a request)
        self.has_body = self.chunked or self.content_length > 0
        if self._custom:
            self.lines = without(self.lines, self._custom)
        if not self._host_seen and self.authority is not None:
            self.lines.append(b"host: " + self.authority + b"\r\n")
        self.upgrade = self._connection_upgrade and bool(self.upgrade_value)  # as httptools


def split_target(method: bytes, url: bytes) -> tuple[bytes, bytes | None]:
    """(origin-form target, authority of an absolute-form URL; a CONNECT's authority-form
    target is both). ValueError when unusable."""
    if method == b"CONNECT":  # authority-form, and only it
        host, _, port = url.rpartition(b":")
        if not host or b"@" in host or b"/" in host or not port.isdigit():
            raise ValueError(f"CONNECT target {url[:64]!r} is not HOST:PORT")
        return url, url
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


def request_head(method: bytes, url: bytes, version: str) -> RequestHead:
    """A request head from its request line, for its header lines to be ``add``ed to;
    ValueError when the target is unusable."""
    if url[:1] == b"/" and method != b"CONNECT":  # origin-form: nearly every request
        return RequestHead(method, url, version)
    target, authority = split_target(method, url)
    return RequestHead(method, target, version, authority)


def parse_request_head(
    method: bytes, url: bytes, version: str, headers: Headers, keep_alive: bool
) -> RequestHead:
    """A whole request head at once (``request_head``, ``add`` each line, ``complete``)."""
    head = request_head(method, url, version)
    for name, value in headers:
        head.add(name, value)
    head.complete(keep_alive)
    return head


#: the lines an outbound sidecar ends a request head with (``upstream_request``; an
#: x-request-id it made is the last of the head's own lines, ``ensure_request_id``), exactly
#: as it writes them, and the blank line after them; or the blank line that ends a head
#: without them, whichever comes first. An inbound sidecar reads them off the read with this
#: one search (``cut_mesh_tail``) instead of a parser callback and an ``add`` each: in pure
#: Python those five lines cost as much as the rest of the request. What differs in the
#: least (a spelling, a space, a line between them, a number too long) is read line by line;
#: what matches is what llhttp accepts there (visible ASCII, no space around a value).
MESH_TAIL: Final = re.compile(
    rb"\r\n(?:\r\n|(x-request-id: ([!-~]++)\r\n|)"  # (the line as forwarded, and its value)
    rb"x-forwarded-for: ([!-~][ !-~]*+)(?<! )"
    rb"\r\nx-forwarded-proto: http\r\n"
    rb"x-meshlet-attempt: ([0-9]{1,10}+)"
    rb"\r\nx-meshlet-deadline-ms: ([0-9]{1,10}+)\r\n\r\n)"
)


def cut_mesh_tail(data: bytes) -> tuple[bytes, re.Match[bytes]] | None:
    """``data`` (a read that begins with a request) without the mesh's lines that end its
    first head (``MESH_TAIL``), and those lines, for ``RequestHead.mesh_tail``; None when
    that head does not end so (or is not all there)."""
    found = MESH_TAIL.search(data)
    if found is None or found.lastindex is None:  # (none, or the blank line came first)
        return None
    start, end = found.span()
    return data[:start] + data[end - 4 :], found


def _mesh_header(head: RequestHead, action: int, value: bytes) -> None:
    """``x-meshlet-retry`` or ``grpc-timeout`` (the mesh's numbers: ``RequestHead.add``);
    a malformed ``grpc-timeout`` goes on as it came (it is the server's to judge)."""
    if action == RETRY:
        head.retry = value.lower() == b"on"
    else:
        ms = grpctimeout.parse_ms(value)
        if ms is None:
            head.lines.append(b"grpc-timeout: %s\r\n" % value)
        elif head.grpc_timeout_ms is None or ms < head.grpc_timeout_ms:
            head.grpc_timeout_ms = ms


#: the most ``upstream_request`` keeps of an upstream's last head lines (``ends``)
DEADLINE_ENDS: Final = 16
#: ``x-meshlet-attempt`` lines of the first tries, made once
_ATTEMPT_LINES: Final = tuple(b"x-meshlet-attempt: %d\r\n" % n for n in range(8))


def upstream_request(
    head: RequestHead,
    client_ip: bytes,
    attempt: int = 0,
    deadline_ms: int | None = None,
    grpc_ms: int | None = None,
    ends: dict[int, bytes] | None = None,
) -> bytes:
    """The head sent upstream: origin-form, HTTP/1.1, hop-by-hop removed, X-Forwarded-For
    appended, X-Forwarded-Proto set, X-Request-Id added when absent (``ensure_request_id``);
    which try this is and the milliseconds left (``x-meshlet-attempt``,
    ``x-meshlet-deadline-ms``) when given, and a gRPC caller's deadline left
    (``grpc-timeout``) when given. (``http2.upstream_headers`` makes the same head for an
    HTTP/2 upstream.) ``ends``: the heads' last lines made so far for the same upstream, by
    milliseconds left, kept and reused (``DEADLINE_ENDS`` at most)."""
    if not head.request_id:  # (``ensure_request_id``, inline: once a request)
        head.request_id = _REQUEST_IDS.new()
        head.lines.append(b"x-request-id: " + head.request_id + b"\r\n")
    forwarded = head.forwarded_for
    out = [  # (one list display: each append is a method call in pure Python)
        head.method,
        b" ",
        head.target,
        b" HTTP/1.1\r\n",
        *head.lines,
        b"x-forwarded-for: ",
        forwarded + b", " + client_ip if forwarded else client_ip,
        b"\r\nx-forwarded-proto: http\r\n",
    ]
    if head.chunked:
        if head.codings:
            out.append(b"transfer-encoding: " + head.codings + b", chunked\r\n")
        else:
            out.append(b"transfer-encoding: chunked\r\n")
    if head.upgrade:
        out.append(b"connection: upgrade\r\nupgrade: " + head.upgrade_value + b"\r\n")
    if grpc_ms is not None:
        out.append(b"grpc-timeout: " + grpctimeout.format_ms(grpc_ms) + b"\r\n")
    if attempt:
        out.append(
            _ATTEMPT_LINES[attempt]
            if attempt < len(_ATTEMPT_LINES)
            else b"x-meshlet-attempt: %d\r\n" % attempt
        )
    if deadline_ms is not None:  # (the head's last line, and the blank line that ends it)
        # An upstream's requests carry few values here (its route's timeout, less what the
        # last hop spent, whole milliseconds), and a lookup costs a third of formatting one.
        end = ends.get(deadline_ms) if ends is not None else None
        if end is None:
            end = b"x-meshlet-deadline-ms: %d\r\n\r\n" % deadline_ms
            if ends is not None:
                if len(ends) >= DEADLINE_ENDS:
                    ends.clear()
                ends[deadline_ms] = end
        out.append(end)
    else:
        out.append(b"\r\n")
    return b"".join(out)


def ensure_request_id(head: RequestHead) -> None:
    """A head without an X-Request-Id gets one, among its ``lines``: every try of the
    request sends the same."""
    if not head.request_id:
        head.request_id = _REQUEST_IDS.new()  # (``new_request_id``, inline: once a request)
        head.lines.append(b"x-request-id: " + head.request_id + b"\r\n")


# -- responses --------------------------------------------------------------------------------


class ResponseHead(HeadLines):
    """An upstream's response head, classified, with its header lines ready to forward."""

    __slots__ = (
        "chunked",
        "close",
        "codings",
        "framing",
        "grpc_status",
        "reason",
        "sized",
        "status",
    )

    def __init__(self, status: int, reason: bytes) -> None:
        self.status = status
        self.reason = reason
        self.lines = []
        #: the final transfer coding is chunked
        self.chunked = False
        #: transfer codings other than a final chunked (a read-until-close body), kept
        self.codings = b""
        #: has a Content-Length
        self.sized = False
        #: the upstream closes the connection after it
        self.close = False
        self.upgrade_value = b""
        #: where its body ends, as the upstream sends it (``framing.response_framing``; the
        #: answer to a HEAD request has none, whatever this says)
        self.framing = framing.EMPTY
        #: a gRPC trailers-only response's ``grpc-status`` (its trailers follow the head;
        #: ``h2upstream``), -1 for any other response
        self.grpc_status = -1
        self.unlisted = self.unlisted_bytes = 0
        self._te = None
        self._custom = None

    def __repr__(self) -> str:
        return f"<ResponseHead {self.status} {self.framing.name} [{len(self.lines)} headers]>"

    def add(self, name: bytes, value: bytes) -> None:
        """One header line, as it came: read, and forwarded or dropped."""
        actions = RESPONSE  # (``action_of``, its common case inline, as ``RequestHead.add``)
        action = actions.get(name, -1)
        if action < 0:
            action = action_of(actions, name)
        if action == FORWARD:
            self.lines.append(b"%s: %s\r\n" % (name, value))
            return
        if action == CL:
            self.sized = True
            self.lines.append(b"%s: %s\r\n" % (name, value))
            return
        self.unlisted += 1  # read, or dropped: not among the lines (counted, for the limits)
        self.unlisted_bytes += len(name) + len(value) + 4
        tokens = self._hop_by_hop(action, value)
        if tokens is not None:
            self.close = self.close or b"close" in tokens

    def complete(self) -> None:
        """The last header line came: what the lines decide together, its framing."""
        te = self._te
        if te:
            self.chunked = te[-1].lower() == b"chunked"
            self.codings = b", ".join(te[:-1] if self.chunked else te)
        if self._custom:
            self.lines = without(self.lines, self._custom)
        self.framing = response_framing(
            self.status,
            head_request=False,
            coded=self.chunked or bool(self.codings),
            chunked=self.chunked,
            sized=self.sized,
        )


def parse_response_head(status: int, reason: bytes, headers: Headers) -> ResponseHead:
    """A whole response head at once (``add`` each line, ``complete``)."""
    resp = ResponseHead(status, reason)
    for name, value in headers:
        resp.add(name, value)
    resp.complete()
    return resp


def retry_after(resp: ResponseHead) -> float | None:
    """Seconds a ``Retry-After`` asks for (delay-seconds or an HTTP date), or None."""
    found = None
    for line in b"".join(resp.lines).split(b"\r\n"):  # (a head read whole is one item)
        name, colon, rest = line.partition(b":")
        if colon and name.lower() == b"retry-after":
            found = rest
            break
    if found is None:
        return None
    value = found.strip().decode("latin-1")
    if value.isdigit():
        return float(value)
    # (imported here: the ``email`` package is 0.65 MB of an idle sidecar's RSS, and a date
    # in Retry-After is rare)
    import email.utils

    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - wall())


_DAYS: Final = (b"Mon", b"Tue", b"Wed", b"Thu", b"Fri", b"Sat", b"Sun")
_MONTHS: Final = (
    b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"
)  # fmt: skip


def http_date(when: float) -> bytes:
    """``when`` (seconds since the epoch) as an HTTP date, in IMF-fixdate (RFC 9110 5.6.7):
    what ``email.utils.formatdate(usegmt=True)`` writes, without the ``email`` package."""
    t = time.gmtime(when)
    day, month = _DAYS[t.tm_wday], _MONTHS[t.tm_mon - 1]
    return b"%s, %02d %s %04d %02d:%02d:%02d GMT" % (
        day, t.tm_mday, month, t.tm_year, t.tm_hour, t.tm_min, t.tm_sec
    )  # fmt: skip


#: the status lines of final responses with their usual reason phrase, made once:
#: ``status -> (reason, line)``, for a response with that reason or none
_STATUS_LINES: Final[dict[int, tuple[bytes, bytes]]] = {
    s.value: (s.phrase.encode(), b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()))
    for s in HTTPStatus
    if s.value >= 200
}


def reason_phrase(status: int, given: bytes) -> bytes:
    if given:
        return given
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def downstream_response(
    resp: ResponseHead, chunked: bool, keep_alive: bool, client_version: str
) -> bytes:
    """The head sent to the client, with our framing and Connection."""
    usual = _STATUS_LINES.get(resp.status)
    if usual is not None and (not resp.reason or resp.reason == usual[0]):
        line = usual[1]
    else:
        line = b"HTTP/1.1 %d %s\r\n" % (resp.status, reason_phrase(resp.status, resp.reason))
    if chunked:
        codings = resp.codings + b", chunked" if resp.codings else b"chunked"
        coded = b"transfer-encoding: " + codings + b"\r\n"
    elif resp.codings:
        coded = b"transfer-encoding: " + resp.codings + b"\r\n"
    else:
        coded = b""
    if not keep_alive:
        end = b"connection: close\r\n\r\n"
    elif client_version == "1.0":
        end = b"connection: keep-alive\r\n\r\n"
    else:
        end = b"\r\n"
    return b"".join([line, *resp.lines, coded, end])  # (a display: no method calls)


def interim_response(resp: ResponseHead) -> bytes:
    """A 1xx head as is (101 keeps its Upgrade and Connection: upgrade)."""
    end = (
        b"connection: upgrade\r\nupgrade: " + resp.upgrade_value + b"\r\n\r\n"
        if resp.status == 101
        else b"\r\n"
    )
    out = [b"HTTP/1.1 %d %s\r\n" % (resp.status, reason_phrase(resp.status, resp.reason))]
    out.extend(resp.lines)
    out.append(end)
    return b"".join(out)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


def last_chunk(trailers: Headers) -> bytes:
    return b"0\r\n" + b"".join(n + b": " + v + b"\r\n" for n, v in trailers) + b"\r\n"
