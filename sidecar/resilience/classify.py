"""Every try's end, classified once (linkerd2-proxy's ``classify``): a response's status or
the error that ended the try becomes an ``Outcome``, and everything that learns from tries
asks the outcome, never the status: the endpoint's latency cost and outlier ejection
(``failed``), the retry policy (``event``, ``label``) and Retry-After (``pauses``).

    a response   5xx: the endpoint failed; 4xx and below: it did its job (a 429 that
                 ``retry_on`` lists is retried, but it is the client's failure, not the
                 endpoint's); 429 and 503 may ask for a pause (``Retry-After``)
    an error     a refused or timed-out connect, a reset, a try out of its time, a malformed
                 response: the endpoint failed
"""

from __future__ import annotations

from dataclasses import dataclass
from http import HTTPStatus
from typing import Final

from sidecar.errors import Reason


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


def response(status: int) -> Outcome:
    """The outcome of a try answered with ``status``."""
    outcome = _RESPONSES.get(status)
    return outcome if outcome is not None else _of_status(status)


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
