"""Every try's end, classified once (linkerd2-proxy's ``classify``): a response's status or
the error that ended the try becomes an ``Outcome``, and everything that learns from tries
asks the outcome, never the status: the endpoint's latency cost and outlier ejection
(``failed``), the retry policy (``event``, ``label``) and Retry-After (``pauses``).

    a response   5xx: the endpoint failed; 4xx and below: it did its job (a 429 that
                 ``retry_on`` lists is retried, but it is the client's failure, not the
                 endpoint's); 429 and 503 may ask for a pause (``Retry-After``)
    an error     a refused or timed-out connect, a reset, a try out of its time, a malformed
                 response: the endpoint failed
    a gRPC call  its ``grpc-status`` (a failure is a 200), as the HTTP status that means the
                 same (``grpc.HTTP_OF_CODE``, Envoy's): 14 UNAVAILABLE fails as a 503, 13
                 INTERNAL and 2 UNKNOWN as a 500, 4 DEADLINE_EXCEEDED as a 504; 8
                 RESOURCE_EXHAUSTED, a 429, and the client's mistakes do not. ``retry_on``
                 names five codes: cancelled, deadline_exceeded, internal,
                 resource_exhausted, unavailable
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from control_plane.wire import RETRY_ON_GRPC
from sidecar.errors import Reason
from sidecar.http import grpc
from sidecar.http.http1 import ResponseHead


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a try ended, as what learns from it needs to know."""

    status: int
    """the status it was answered with, or the one the sidecar answers for its error"""
    failed: bool
    """the endpoint failed: its latency penalty and outlier ejection count it"""
    event: str | int
    """what ``retry_on`` calls it: the status, ``connect-failure`` or ``reset`` (a try out
    of its time is a 504); "" for what no ``retry_on`` names"""
    label: str
    """the retry metric's ``reason`` for it"""
    pauses: bool = False
    """a 429 or 503: its ``Retry-After`` may ask that the endpoint be left alone"""
    grpc_status: int = -1
    """a gRPC call's ``grpc-status``, 17 for any code outside the 17 (-1: not a gRPC
    status)"""


def _of_status(status: int) -> Outcome:
    pauses = status == 429 or status == 503
    return Outcome(status, status >= 500, status, str(status), pauses)


#: the outcomes of the registered statuses, made once (never written after import)
_RESPONSES: Final = {s.value: _of_status(s.value) for s in HTTPStatus}

_ERRORS: Final = {
    Reason.UPSTREAM_CONNECT_FAILURE: Outcome(502, True, "connect-failure", "connect-failure"),
    Reason.UPSTREAM_RESET: Outcome(502, True, "reset", "reset"),
    Reason.UPSTREAM_TIMEOUT: Outcome(504, True, 504, "timeout"),
    Reason.UPSTREAM_PROTOCOL_ERROR: Outcome(502, True, "", "upstream-protocol-error"),
}


#: what ``retry_on`` may name of the gRPC codes (Envoy's ``retry_on`` for gRPC)
RETRIABLE_CODES: Final = frozenset(RETRY_ON_GRPC)


def _of_code(code: int) -> Outcome:
    name = grpc.name(code)
    event = name if name in RETRIABLE_CODES else ""
    return Outcome(200, grpc.http_status(code) >= 500, event, name, False, code)


#: the outcomes of the 17 codes, then of any other (a server's own: as UNKNOWN, a 500), made
#: once
_CODES: Final = tuple(_of_code(code) for code in range(len(grpc.NAMES) + 1))


def response(status: int) -> Outcome:
    """The outcome of a try answered with ``status``."""
    outcome = _RESPONSES.get(status)
    return outcome if outcome is not None else _of_status(status)


def response_head(resp: ResponseHead, grpc_call: bool) -> Outcome:
    """The outcome of a try answered with the final head ``resp``: a gRPC call's
    trailers-only answer (its ``grpc-status`` in the head) by its code, any other by its
    status (a gRPC call's code in its trailers is classified when they come)."""
    code = resp.grpc_status
    if code >= 0 and grpc_call:
        return grpc_response(code)
    outcome = _RESPONSES.get(resp.status)  # (``response``, inline: once a request)
    return outcome if outcome is not None else _of_status(resp.status)


def grpc_response(code: int) -> Outcome:
    """The outcome of a gRPC call answered with ``grpc-status: code``."""
    return _CODES[code] if 0 <= code < len(grpc.NAMES) else _CODES[-1]


def error(reason: Reason) -> Outcome:
    """The outcome of a try that ended without a usable response; the sidecar's own answers
    that are no try's (no route, overloaded, ...) fail no endpoint."""
    outcome = _ERRORS.get(reason)
    if outcome is None:
        return Outcome(reason.status, False, "", reason.code)
    return outcome


def failed(reason: Reason) -> bool:
    """Whether the sidecar's answer ``reason`` is a failure of the endpoint it tried."""
    return reason in _ERRORS
