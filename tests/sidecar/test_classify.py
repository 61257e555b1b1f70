"""One classification of every try's end (linkerd's ``classify``)."""

from __future__ import annotations

import pytest

from control_plane.wire import RETRY_ON_GRPC
from sidecar.errors import Reason
from sidecar.http import grpc
from sidecar.http.http1 import ResponseHead
from sidecar.resilience import classify


@pytest.mark.parametrize(
    ("status", "failed", "pauses"),
    [
        (200, False, False),
        (404, False, False),
        (429, False, True),
        (500, True, False),
        (503, True, True),
        (504, True, False),
        (599, True, False),
        (299, False, False),
    ],
)
def test_responses(status: int, failed: bool, pauses: bool) -> None:
    outcome = classify.response(status)
    assert (outcome.failed, outcome.pauses) == (failed, pauses)
    assert (outcome.status, outcome.event, outcome.label) == (status, status, str(status))


def test_errors_fail_the_endpoint_and_name_their_retry_event() -> None:
    named = {
        reason: (o.failed, o.event, o.label)
        for reason in Reason
        if (o := classify.error(reason)).failed
    }
    assert named == {
        Reason.UPSTREAM_CONNECT_FAILURE: (True, "connect-failure", "connect-failure"),
        Reason.UPSTREAM_RESET: (True, "reset", "reset"),
        Reason.UPSTREAM_TIMEOUT: (True, 504, "timeout"),  # retry_on's 504 covers it
        Reason.UPSTREAM_PROTOCOL_ERROR: (True, "", "upstream-protocol-error"),
    }
    assert all(classify.failed(reason) == (reason in named) for reason in Reason)


def test_the_sidecars_own_answers_fail_no_endpoint() -> None:
    overloaded = classify.error(Reason.OVERLOADED)
    assert (overloaded.status, overloaded.failed, overloaded.event) == (503, False, "")


# -- gRPC: a call's grpc-status, as the HTTP status that means the same (Envoy's table) -----


@pytest.mark.parametrize(
    ("code", "failed", "event", "label"),
    [
        (0, False, "", "ok"),
        (1, False, "cancelled", "cancelled"),  # a 499: the client's
        (2, True, "", "unknown"),  # a 500
        (3, False, "", "invalid_argument"),
        (4, True, "deadline_exceeded", "deadline_exceeded"),  # a 504
        (5, False, "", "not_found"),
        (7, False, "", "permission_denied"),
        (8, False, "resource_exhausted", "resource_exhausted"),  # a 429: not the endpoint's
        (12, True, "", "unimplemented"),  # a 501
        (13, True, "internal", "internal"),  # a 500
        (14, True, "unavailable", "unavailable"),  # a 503
        (15, True, "", "data_loss"),
        (16, False, "", "unauthenticated"),
        (99, True, "", "other"),  # a server's own code: a 500, as Envoy's default
    ],
)
def test_grpc_codes(code: int, failed: bool, event: str, label: str) -> None:
    outcome = classify.grpc_response(code)
    assert (outcome.failed, outcome.event, outcome.label) == (failed, event, label)
    assert (outcome.status, outcome.grpc_status, outcome.pauses) == (200, min(code, 17), False)
    # failed exactly as the HTTP status Envoy maps the code to would fail
    assert outcome.failed == classify.response(grpc.http_status(code)).failed


def test_grpc_outcomes_are_made_once() -> None:
    """Table-driven: the same outcome object for every call with a code."""
    assert all(classify.grpc_response(c) is classify.grpc_response(c) for c in range(-1, 99))
    assert {classify.grpc_response(c).event for c in range(17)} - {""} == set(RETRY_ON_GRPC)


def test_http_answers_are_no_grpc_outcomes() -> None:
    assert classify.response(200).grpc_status == -1
    assert classify.error(Reason.UPSTREAM_RESET).grpc_status == -1


def test_a_response_head_by_its_grpc_status_only_for_a_grpc_call() -> None:
    """A trailers-only answer (grpc-status in the head) of a gRPC call is judged by its code;
    a head of anything else, or without a code, by its HTTP status."""
    trailers_only = ResponseHead(200, b"OK")
    trailers_only.grpc_status = 14  # unavailable
    assert classify.response_head(trailers_only, True) is classify.grpc_response(14)
    assert classify.response_head(trailers_only, False) is classify.response(200)
    plain = ResponseHead(503, b"")
    assert classify.response_head(plain, True) is classify.response(503)
