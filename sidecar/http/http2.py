"""HTTP/2 heads mapped onto the HTTP/1.1 ones the proxy rewrites (``http1``), and back.

A stream's request head (pseudo-headers first, names lower-case, as the ``h2`` library hands
them over, already checked against RFC 9113 8.2) becomes a ``RequestHead`` as if it had come
over HTTP/1.1: ``:method`` and ``:path`` make the request line, ``:authority`` the Host, split
``cookie`` fields are joined again (RFC 9113 8.2.3), a body whose length no
``content-length`` gives is chunked upstream, and an ``application/grpc*`` content-type makes
it a gRPC call (``grpc``). A response head goes the other way: its lines,
hop-by-hop headers already gone, lower-cased under a ``:status``; and so does a request to an
HTTP/2 upstream (``upstream_headers``): the head an HTTP/1.1 upstream gets
(``http1.upstream_request``) as fields, those of a request that came over HTTP/2 as they came
(``H2RequestHead``), without a detour through bytes that a parser reads back.

What goes to the client, and to an HTTP/2 upstream (``h2upstream``), is made ready here, not
by the codec (``h2conn`` and ``h2upstream`` turn off h2's outbound normalisation and
validation, a tenth of its cost per exchange each way): names lower-cased and stripped, values
stripped, no connection-specific field nor ``te`` (RFC 9113 8.2.2), no empty or pseudo-header
name but ``:status`` first, and ``authorization`` fields (and a short ``cookie``) never indexed
by HPACK, as h2's ``_secure_headers`` would, nor the values new each request (``x-request-id``).

The ``hpack`` library's loggers are disabled on import: they log each field coded, at debug,
secrets too (``authorization``, under ``--log-level debug``), and cost a ``Logger.debug``
call each time even when nothing is logged (``HPACK_LOGGERS``). And a ``hyperframe`` frame's
``repr`` is ``object``'s (``FRAME_REPR``): the ``h2`` codec makes one of each frame it
receives, for a trace call of its logger that writes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import Frame

from sidecar.errors import Reason
from sidecar.http import grpc, grpctimeout
from sidecar.http.http1 import (
    HTTP2_VERSION,
    Headers,
    RequestHead,
    ResponseHead,
    ensure_request_id,
)

#: headers RFC 9113 8.2.2 forbids in HTTP/2 (a response line of one is not forwarded)
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: fields not sent over HTTP/2: the connection-specific ones, and ``te`` (a request's; an
#: upstream is sent the sidecar's own ``te: trailers``)
NOT_SENT: Final = _CONNECTION_SPECIFIC | {b"te"}
#: request fields not sent to an HTTP/2 upstream as they are: ``NOT_SENT``, and ``host``,
#: which is its ``:authority``
_NOT_SENT_UPSTREAM: Final = NOT_SENT | {b"host"}
#: fields kept out of the HPACK table: secrets (h2's ``_secure_headers``; a ``cookie`` when
#: short), and the values the sidecar writes new for each request (``upstream_headers``),
#: which would only push the others out of the table, and make each of the encoder's lookups,
#: a walk of the table, the longer (30 % of the upstream's encoding, with x-request-id indexed)
_NOT_INDEXED: Final = frozenset(
    {
        b"authorization",
        b"proxy-authorization",
        b"x-request-id",
        b"grpc-timeout",
        b"x-meshlet-deadline-ms",
    }
)
#: the ``hpack`` library's loggers, disabled: they never write a field's value (a secret) to
#: the sidecar's log, and their ``debug`` calls, about 60 a unary gRPC exchange through the
#: sidecar, stop at ``isEnabledFor``'s first check (17k instructions less an exchange, of
#: the calls' 120k: ``bench_h2_library``)
HPACK_LOGGERS: Final = ("hpack.hpack", "hpack.table")
for _name in HPACK_LOGGERS:
    logging.getLogger(_name).disabled = True
#: what ``repr`` says of a frame: its type and address, not its fields (h2's
#: ``_receive_frame`` calls ``repr(frame)`` for each frame received, to hand it to its
#: ``DummyLogger``'s ``trace``, which drops it: hyperframe's own repr formats the flags and
#: the body in Python each time, 73k instructions a unary gRPC exchange through the sidecar,
#: 3 % of it; no log of the sidecar shows a frame)
FRAME_REPR: Final = object.__repr__
Frame.__repr__ = FRAME_REPR  # type: ignore[method-assign]
_STATUS: Final = {status: str(status).encode() for status in range(100, 600)}
_NEW_TUPLE: Final = tuple.__new__
#: the bytes a received field's name may hold (RFC 9113 8.2.1: no upper case, no control,
#: space, ``:``, DEL or non-ASCII byte)
_NAME_BYTES: Final = bytes(c for c in range(0x21, 0x7F) if c != 0x3A and not 0x41 <= c <= 0x5A)
#: names ``check_field`` took already, up to ``_NAMES_KEPT`` of them (a set lookup, not the
#: ``translate`` of each name that builds its table each time, 1.4k instructions)
_NAMES_TAKEN: Final[set[bytes]] = set()
_NAMES_KEPT: Final = 1024
#: what a field's value may not begin or end with (SP, HTAB)
_AROUND: Final = (0x20, 0x09)
#: a request's pseudo-headers, each with the bit ``request_head`` marks it seen by
_REQUEST_PSEUDO: Final = {b":method": 1, b":scheme": 2, b":authority": 4, b":path": 8}


class Malformed(Exception):
    """A received header block RFC 9113 (8.2, 8.3) calls malformed: the connection is refused
    with PROTOCOL_ERROR, as the ``h2`` codec's own check would refuse it. That check is turned
    off (``h2conn.server_config``, ``h2upstream.client_config``): per field it loops over
    every byte in Python, a tenth of the codec's cost per exchange; these checks are the same
    rules, compiled."""


def check_field(name: bytes, value: bytes) -> None:
    """Malformed unless a received field (not a pseudo-header) may be taken: RFC 9113 8.2.1
    (its characters) and 8.2.2 (no connection-specific field, ``te`` only as ``trailers``)."""
    if name not in _NAMES_TAKEN:
        if not name or name.translate(None, _NAME_BYTES):
            raise Malformed(f"field name {name[:64]!r}")
        if len(_NAMES_TAKEN) < _NAMES_KEPT:
            _NAMES_TAKEN.add(name)
    _check_value(name, value)
    if name in _CONNECTION_SPECIFIC or (name == b"te" and value.lower() != b"trailers"):
        raise Malformed(f"connection-specific field {name!r}")


def _check_value(name: bytes, value: bytes) -> None:
    """No NUL, CR or LF; no whitespace around (RFC 9113 8.2.1). (The bytes looked for as
    ints: ``b"\\r" in value`` tries the needle as an int first, a TypeError raised and
    cleared each time, 2k instructions.)"""
    if value and (
        0x0D in value or 0x0A in value or 0 in value or value[0] in _AROUND or value[-1] in _AROUND
    ):
        raise Malformed(f"the value of {name[:64]!r}")


def check_trailers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Malformed unless received trailers may be taken: no pseudo-header, fields as
    ``check_field`` takes them."""
    for name, value in headers:
        if name[:1] == b":":
            raise Malformed(f"pseudo-header {name[:64]!r} in trailers")
        check_field(name, value)


def request_head(headers: Sequence[tuple[bytes, bytes]], ended: bool) -> RequestHead:
    """The request of a stream's ``headers`` (``ended``: no body follows). Malformed when
    RFC 9113 says so (8.2, 8.3.1); ValueError, its message for the client, when the proxy
    cannot forward it."""
    method = path = authority = b""
    host: bytes | None = None
    seen = 0  # the pseudo-headers seen (``_REQUEST_PSEUDO``'s bits)
    is_grpc = False
    cookies: list[bytes] = []
    regular: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            bit = _REQUEST_PSEUDO.get(name, 0)
            if not bit or seen & bit or regular or cookies:
                raise Malformed(f"pseudo-header {name[:64]!r} unknown, repeated or late")
            seen |= bit
            _check_value(name, value)
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        check_field(name, value)
        if name == b"cookie":
            cookies.append(value)
            continue
        regular.append((name, value))
        if name == b"host":
            if host is not None:
                raise Malformed("two host fields")
            host = value
        elif name == b"content-type" and grpc.is_grpc(value):
            is_grpc = True
    if not seen & 1:
        raise Malformed("no :method")
    if host is None and not seen & 4:
        raise Malformed("neither :authority nor host")
    if host is not None and seen & 4 and host != authority:
        raise Malformed(":authority and host differ")
    if method != b"CONNECT" and ((seen & 10) != 10 or not path):
        raise Malformed("no :scheme, or no :path")
    if method == b"CONNECT":
        raise ValueError("CONNECT is not served over HTTP/2")
    if not path.startswith(b"/") and not (path == b"*" and method == b"OPTIONS"):
        raise ValueError(f":path {path[:64]!r} is not origin-form")
    head = H2RequestHead(method, path, HTTP2_VERSION, authority or None)
    head.proxied = False  # (the authority is the stream's, not an absolute-form target's)
    head.grpc = is_grpc
    for name, value in regular:
        head.forward(name, value)
    if cookies:
        head.forward(b"cookie", b"; ".join(cookies))
    head.complete(True)
    # (``complete`` may add a ``host`` line, not sent to an HTTP/2 upstream; it drops none:
    # ``connection``, whose names it would drop, is refused above)
    head.mirrored = len(head.lines)
    if not ended and head.content_length < 0:  # a body of a length only its end will tell
        head.chunked = head.has_body = True
    return head


class H2RequestHead(RequestHead):
    """A request head that came over HTTP/2 (``request_head``), with the fields its first
    ``mirrored`` lines were made of, ready to send on to an HTTP/2 upstream as they came
    (``fields``: ``upstream_headers`` need not split those lines again)."""

    __slots__ = ("fields", "mirrored")

    def __init__(self, method: bytes, target: bytes, version: str, authority: bytes | None) -> None:
        super().__init__(method, target, version, authority)
        self.fields: Headers = []
        self.mirrored = 0

    def forward(self, name: bytes, value: bytes) -> None:
        """A field received (``check_field`` took it): a line of the head, as ``add`` makes
        one (or none), and then a field to send on (not ``host``: the ``:authority``)."""
        lines = len(self.lines)
        self.add(name, value)
        if len(self.lines) > lines and name != b"host":
            add_field(self.fields, name, value)


def upstream_headers(
    head: RequestHead,
    client_ip: bytes,
    attempt: int,
    deadline_ms: int | None,
    grpc_ms: int | None,
) -> Headers:
    """The HEADERS of a request sent to an HTTP/2 upstream: the head an HTTP/1.1 upstream
    gets (``http1.upstream_request``) as fields, made ready to send (``add_field``), without
    what HTTP/2 does not carry: its pseudo-headers, ``te: trailers`` (the sidecar passes
    trailers on, which gRPC servers ask callers to say), the head's fields, then the proxy's
    own."""
    ensure_request_id(head)
    fields: Headers = [
        (b":method", head.method),
        (b":scheme", b"http"),
        (b":authority", head.authority or b""),
        (b":path", head.target),
        (b"te", b"trailers"),
    ]
    lines = head.lines
    if isinstance(head, H2RequestHead):  # (its lines added since, split below: the peer's)
        fields += head.fields
        lines = lines[head.mirrored :]
    if lines:
        for line in b"".join(lines).split(b"\r\n"):
            name, _, value = line.partition(b":")
            name = name.lower()  # (a client's HTTP/1.1 head keeps its names' case)
            if name and name not in _NOT_SENT_UPSTREAM:
                add_field(fields, name, value.strip())
    forwarded = head.forwarded_for
    xff = (forwarded + b", " + client_ip).strip() if forwarded else client_ip
    fields += ((b"x-forwarded-for", xff), (b"x-forwarded-proto", b"http"))
    if grpc_ms is not None:
        add_field(fields, b"grpc-timeout", grpctimeout.format_ms(grpc_ms))
    if attempt:
        fields.append((b"x-meshlet-attempt", b"%d" % attempt))
    if deadline_ms is not None:
        add_field(fields, b"x-meshlet-deadline-ms", b"%d" % deadline_ms)
    return fields


def upstream_trailer(out: Headers, name: bytes, value: bytes) -> None:
    """Add a request trailer for an HTTP/2 upstream to ``out``, unless HTTP/2 does not carry
    it."""
    name = name.lower()
    if name not in _NOT_SENT_UPSTREAM:
        add_field(out, name, value.strip())


class H2ResponseHead(ResponseHead):
    """A response head that came over HTTP/2 (``h2upstream``), with the fields it forwards
    ready to send on as they came (``fields``: ``:status``, then one a line), so that
    ``response_headers`` need not split its lines again."""

    __slots__ = ("fields",)

    def __init__(self, status: int) -> None:
        super().__init__(status, b"")
        self.fields: Headers = [(b":status", _STATUS.get(status) or str(status).encode())]

    def forward(self, name: bytes, value: bytes) -> None:
        """A field received (``check_field`` took it): a line of the head, as ``add`` makes
        one (or none), and then a field to send on."""
        lines = len(self.lines)
        self.add(name, value)
        if len(self.lines) > lines:
            add_field(self.fields, name, value)


def response_headers(resp: ResponseHead) -> Headers:
    """The HTTP/2 head of an upstream's response: ``:status``, then its lines."""
    if isinstance(resp, H2ResponseHead) and len(resp.fields) == len(resp.lines) + 1:
        return resp.fields  # (as its lines would make them: none dropped since)
    out: Headers = [(b":status", _STATUS.get(resp.status) or str(resp.status).encode())]
    # (one entry of ``lines`` may hold several header lines: a head read whole, ``wholehead``)
    for line in b"".join(resp.lines).split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if not name or name in NOT_SENT:
            continue
        add_field(out, name, value.strip())
    return out


def add_field(out: Headers, name: bytes, value: bytes) -> None:
    """Add a field to send (``name`` lower-case, ``value`` stripped), kept out of the HPACK
    table if it is a secret or new each request. (Appended here: returned as a
    ``tuple[bytes, bytes]``, a ``NeverIndexedHeaderTuple`` would be unboxed by mypyc, and
    indexed after all. Made as its ``__new__`` makes it, without calling that: a Python
    function taking ``*args``, 2.7 times the cost.)"""
    if name in _NOT_INDEXED or (name == b"cookie" and len(value) < 20):
        out.append(_NEW_TUPLE(NeverIndexedHeaderTuple, (name, value)))
    else:
        out.append((name, value))


def trailer_field(name: bytes, value: bytes) -> tuple[bytes, bytes] | None:
    """A trailer field as HTTP/2 carries it, or None for one it may not carry."""
    name = name.strip().lower()
    if not name or name in NOT_SENT or name[:1] == b":":
        return None
    return name, value.strip()


def error_headers(reason: Reason, body: bytes) -> Headers:
    """The head of the sidecar's own answer (``errors.error_response`` for HTTP/1)."""
    return [
        (b":status", _STATUS[reason.status]),
        (b"content-type", b"text/plain; charset=utf-8"),
        (b"x-meshlet-error", reason.code.encode()),
        (b"content-length", b"%d" % len(body)),
    ]


def error_body(reason: Reason, detail: str) -> bytes:
    return f"{reason.code}: {detail}\n".encode()
