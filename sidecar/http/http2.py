"""HTTP/2 heads mapped onto the HTTP/1.1 ones the proxy rewrites (``http1``), and back.

A stream's request head (pseudo-headers first, names lower-case, as the ``h2`` library hands
them over, already checked against RFC 9113 8.2) becomes a ``RequestHead`` as if it had come
over HTTP/1.1: ``:method`` and ``:path`` make the request line, ``:authority`` the Host, split
``cookie`` fields are joined again (RFC 9113 8.2.3), a body whose length no
``content-length`` gives is chunked upstream, and an ``application/grpc*`` content-type makes
it a gRPC call (``grpc``). A response head goes the other way: its lines,
hop-by-hop headers already gone, lower-cased under a ``:status``.

What goes to the client is made ready here, not by the codec (``h2conn`` turns off h2's
outbound normalisation and validation, a tenth of its cost per exchange): names lower-cased
and stripped, values stripped, no connection-specific field nor ``te`` (RFC 9113 8.2.2), no
empty or pseudo-header name but ``:status`` first, and ``authorization`` fields (and a short
``cookie``) never indexed by HPACK, as h2's ``_secure_headers`` would.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from hpack import NeverIndexedHeaderTuple

from sidecar.errors import Reason
from sidecar.http import grpc
from sidecar.http.http1 import Headers, RequestHead, ResponseHead

#: what ``request_head`` calls an HTTP/2 request's version (the access log's, never sent)
VERSION: Final = "2"
#: headers RFC 9113 8.2.2 forbids in HTTP/2 (a response line of one is not forwarded)
_CONNECTION_SPECIFIC: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)
#: fields not sent to an HTTP/2 client: the connection-specific ones, and ``te`` (a request's)
_NOT_SENT: Final = _CONNECTION_SPECIFIC | {b"te"}
#: fields kept out of the HPACK table (h2's ``_secure_headers``; a ``cookie`` when short)
_SECRET: Final = frozenset({b"authorization", b"proxy-authorization"})
_STATUS: Final = {status: str(status).encode() for status in range(100, 600)}


def request_head(headers: Sequence[tuple[bytes, bytes]], ended: bool) -> RequestHead:
    """The request of a stream's ``headers`` (``ended``: no body follows). ValueError, its
    message for the client, when the proxy cannot forward it."""
    method = path = authority = b""
    is_grpc = False
    cookies: list[bytes] = []
    regular: Headers = []
    for name, value in headers:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
        elif name == b"cookie":
            cookies.append(value)
        else:
            regular.append((name, value))
            if name == b"content-type" and grpc.is_grpc(value):
                is_grpc = True
    if method == b"CONNECT":
        raise ValueError("CONNECT is not served over HTTP/2")
    if not path.startswith(b"/") and not (path == b"*" and method == b"OPTIONS"):
        raise ValueError(f":path {path[:64]!r} is not origin-form")
    head = RequestHead(method, path, VERSION, authority or None)
    head.proxied = False  # (the authority is the stream's, not an absolute-form target's)
    head.grpc = is_grpc
    for name, value in regular:
        head.add(name, value)
    if cookies:
        head.add(b"cookie", b"; ".join(cookies))
    head.complete(True)
    if not ended and head.content_length < 0:  # a body of a length only its end will tell
        head.chunked = head.has_body = True
    return head


def response_headers(resp: ResponseHead) -> Headers:
    """The HTTP/2 head of an upstream's response: ``:status``, then its lines."""
    out: Headers = [(b":status", _STATUS.get(resp.status) or str(resp.status).encode())]
    # (one entry of ``lines`` may hold several header lines: a head read whole, ``wholehead``)
    for line in b"".join(resp.lines).split(b"\r\n"):
        if not line:
            continue
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if not name or name in _NOT_SENT:
            continue
        value = value.strip()
        if name in _SECRET or (name == b"cookie" and len(value) < 20):
            out.append(NeverIndexedHeaderTuple(name, value))
        else:
            out.append((name, value))
    return out


def trailer_field(name: bytes, value: bytes) -> tuple[bytes, bytes] | None:
    """A trailer field as HTTP/2 carries it, or None for one it may not carry."""
    name = name.strip().lower()
    if not name or name in _NOT_SENT or name[:1] == b":":
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
