"""One classification of every try's end (linkerd's ``classify``)."""

from __future__ import annotations

import pytest

from sidecar.errors import Reason
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
