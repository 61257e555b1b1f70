"""gRPC's status codes, as the proxy reads and writes them (the gRPC over HTTP/2 spec,
``PROTOCOL-HTTP2.md``).

A gRPC call's outcome is not its HTTP status (a failure is a 200) but its ``grpc-status``:
in the trailers after the messages, or, for an error without messages, in a *trailers-only*
response, one HEADERS frame that carries ``:status``, ``grpc-status`` and ends the stream.

Two tables, both Envoy's (``source/common/grpc/common.cc``):

    ``HTTP_OF_CODE``  a code as the HTTP status that means the same (``grpcToHttpStatus``):
                      ``classify`` fails an endpoint for a code when it would for that status
    ``code_of``       the code of the sidecar's own answer for a status (``httpToGrpcStatus``,
                      with 429, 413 and 431 as RESOURCE_EXHAUSTED and 504, 408 as
                      DEADLINE_EXCEEDED, where Envoy says UNAVAILABLE and UNKNOWN)
"""

from __future__ import annotations

from typing import Final

#: the 17 codes' names, by code, as ``retry_on`` and the metrics' ``code`` label spell them
NAMES: Final = (
    "ok",
    "cancelled",
    "unknown",
    "invalid_argument",
    "deadline_exceeded",
    "not_found",
    "already_exists",
    "permission_denied",
    "resource_exhausted",
    "failed_precondition",
    "aborted",
    "out_of_range",
    "unimplemented",
    "internal",
    "unavailable",
    "data_loss",
    "unauthenticated",
)
OTHER: Final = "other"
"""the label of a code outside the 17 (a server's own)"""

OK: Final = 0
UNKNOWN: Final = 2
DEADLINE_EXCEEDED: Final = 4
PERMISSION_DENIED: Final = 7
RESOURCE_EXHAUSTED: Final = 8
UNIMPLEMENTED: Final = 12
INTERNAL: Final = 13
UNAVAILABLE: Final = 14

#: by code: the HTTP status that means the same (a code outside the table: 500)
HTTP_OF_CODE: Final = (
    200,  # ok
    499,  # cancelled (the client gave up)
    500,  # unknown
    400,  # invalid_argument
    504,  # deadline_exceeded
    404,  # not_found
    409,  # already_exists
    403,  # permission_denied
    429,  # resource_exhausted
    400,  # failed_precondition
    409,  # aborted
    400,  # out_of_range
    501,  # unimplemented
    500,  # internal
    503,  # unavailable
    500,  # data_loss
    401,  # unauthenticated
)

_CODE_OF_STATUS: Final = {
    400: INTERNAL,
    401: 16,
    403: PERMISSION_DENIED,
    404: UNIMPLEMENTED,
    408: DEADLINE_EXCEEDED,
    413: RESOURCE_EXHAUSTED,
    429: RESOURCE_EXHAUSTED,
    431: RESOURCE_EXHAUSTED,
    502: UNAVAILABLE,
    503: UNAVAILABLE,
    504: DEADLINE_EXCEEDED,
}

CONTENT_TYPE: Final = b"application/grpc"
"""a request whose content-type starts so is a gRPC call (``+proto``, ``+json``: too)"""
_MAX_MESSAGE: Final = 1024
"""characters of a ``grpc-message`` the sidecar writes (its own details are short)"""


def http_status(code: int) -> int:
    """The HTTP status that means what gRPC ``code`` means."""
    return HTTP_OF_CODE[code] if 0 <= code < len(HTTP_OF_CODE) else 500


def code_of(status: int) -> int:
    """The gRPC code of the sidecar's own answer with HTTP ``status``."""
    return _CODE_OF_STATUS.get(status, UNKNOWN)


def name(code: int) -> str:
    """``code``'s label: its name, or ``other``."""
    return NAMES[code] if 0 <= code < len(NAMES) else OTHER


def parse_status(value: bytes) -> int:
    """A ``grpc-status`` value: its code; one that is no number is taken as gRPC's clients
    take it, as UNKNOWN."""
    value = value.strip()
    if value.isdigit() and len(value) <= 9:
        return int(value)
    return UNKNOWN


def is_grpc(content_type: bytes) -> bool:
    """A request of this content-type is a gRPC call."""
    return content_type[:16].lower() == CONTENT_TYPE and (
        len(content_type) == 16 or content_type[16:17] in (b"+", b";")
    )


def encode_message(text: str) -> bytes:
    """``grpc-message``: UTF-8, percent-encoded but for printable ASCII other than ``%``
    (the spec's ``Percent-Encoded``), cut to ``_MAX_MESSAGE`` characters."""
    out = bytearray()
    for byte in text[:_MAX_MESSAGE].encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(byte)
        else:
            out += b"%%%02X" % byte
    return bytes(out)


def trailers_only(code: int, message: str, error: str) -> list[tuple[bytes, bytes]]:
    """The HEADERS of the sidecar's own answer to a gRPC call: a trailers-only response
    (``error``: its ``x-meshlet-error``)."""
    return [(b":status", b"200"), (b"content-type", CONTENT_TYPE), *status(code, message, error)]


def status(code: int, message: str, error: str) -> list[tuple[bytes, bytes]]:
    """The sidecar's status of a gRPC call: the trailers that end a call it fails after
    the response's head went (``error``: its ``x-meshlet-error``)."""
    return [
        (b"grpc-status", b"%d" % code),
        (b"grpc-message", encode_message(message)),
        (b"x-meshlet-error", error.encode()),
    ]
