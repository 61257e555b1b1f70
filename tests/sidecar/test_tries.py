"""The request core on a fake clock: every retry, resend, hedge, deadline and budget decision
that the real-process tests (test_resilience, test_unsent, test_proxy_*, test_client_limits,
integration/test_faults) reach over sockets, here without a socket or an event loop. Each
test names the real-process test it mirrors."""

from __future__ import annotations

import math
from typing import Any

import pytest

from control_plane.wire import parse_policy
from sidecar.clock import FakeClock
from sidecar.errors import Reason
from sidecar.resilience import classify
from sidecar.resilience.budget import MAX_RESENDS
from sidecar.resilience.service import ServiceState
from sidecar.resilience.tries import Due, State, Tries
from sidecar.resilience.trypolicy import TryPolicy

OK = classify.response(200)
UNAVAILABLE = classify.response(503)
CONNECT_FAILURE = classify.error(Reason.UPSTREAM_CONNECT_FAILURE)
RESET = classify.error(Reason.UPSTREAM_RESET)
TIMEOUT = classify.error(Reason.UPSTREAM_TIMEOUT)


class Request:
    """A request's tries as an exchange drives them, on a fake clock."""

    def __init__(self, clock: FakeClock, service: ServiceState, **policy: Any) -> None:
        self.clock = clock
        self.service = service
        relay = policy.pop("relay", False)
        self.policy = TryPolicy.of(parse_policy(policy), relay=relay)
        self.tries = Tries(backoff=lambda n: 0.010 * n)  # deterministic: 10 ms per retry

    def start(self, **kw: Any) -> bool:
        kw.setdefault("request_done", True)
        kw.setdefault("has_body", False)
        kw.setdefault("retryable", True)
        return self.tries.start(self.clock.now, self.policy, self.service, **kw)

    def send(self, *, resend: bool = False) -> None:
        """A try starts and its request goes out."""
        self.tries.try_started(self.clock.now, resend=resend)
        self.tries.state = State.SENT

    def retry(self, outcome: classify.Outcome, retry_after: float | None = None) -> float | None:
        """What the exchange does after a sent try failed: the retry policy's answer."""
        tries = self.tries
        tries.try_abandoned()
        if not tries.retriable(outcome):
            return None
        delay = tries.retry_delay(self.clock.now, retry_after, lambda: False)
        if delay is not None:
            tries.begin_backoff(outcome)
        return delay

    def resend(self, outcome: classify.Outcome, *, hedged: bool = False) -> bool:
        """What the exchange does after a try none of which went out failed."""
        tries = self.tries
        tries.try_abandoned()
        return tries.may_resend(self.clock.now, hedged=hedged) and tries.resend(
            self.clock.now, outcome
        )

    def timer(self) -> Due:
        """The connection's timer, at the deadline the core asked for."""
        self.clock.now = max(self.clock.now, self.tries.next_deadline())
        return self.tries.on_timer(self.clock.now)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service() -> ServiceState:
    return ServiceState("svc")


# -- test_resilience -------------------------------------------------------------------------


def test_a_retriable_status_is_retried(clock: FakeClock, service: ServiceState) -> None:
    """test_a_retriable_status_is_retried_on_another_endpoint"""
    r = Request(clock, service)
    assert r.start()
    r.send()
    assert r.retry(UNAVAILABLE) == 0.010
    assert r.tries.state is State.BACKOFF
    assert (service.retries, service.retrying, service.retry_reasons) == (1, 1, {"503": 1})
    clock.advance(0.010)
    r.send()
    assert (r.tries.attempt, r.tries.retriable(OK)) == (2, False)
    r.tries.answered()
    r.tries.finish()
    assert (r.tries.state, service.retrying) == (State.DONE, 0)


def test_a_second_failure_is_the_answer(clock: FakeClock, service: ServiceState) -> None:
    """retries: 1 (the default): the retry's 503 goes to the client"""
    r = Request(clock, service)
    r.start()
    r.send()
    assert r.retry(UNAVAILABLE) is not None
    r.send()
    assert r.retry(UNAVAILABLE) is None
    assert service.retries == 1


def test_statuses_not_listed_and_successes_are_answers(
    clock: FakeClock, service: ServiceState
) -> None:
    r = Request(clock, service)
    r.start()
    r.send()
    for status in (200, 404, 500, 429):
        assert not r.tries.retriable(classify.response(status))
    for status in (502, 503, 504):
        assert r.tries.retriable(classify.response(status))


@pytest.mark.parametrize(
    ("retryable", "relayed", "retried"),
    [(True, False, True), (False, False, False), (True, True, False)],
)
def test_only_idempotent_requests_are_retried_unless_asked(
    clock: FakeClock, service: ServiceState, retryable: bool, relayed: bool, retried: bool
) -> None:
    """A POST (not retryable) is not retried unless asked (x-meshlet-retry: on makes it
    retryable); nor is a request an earlier hop retries (x-meshlet-attempt: relayed)."""
    r = Request(clock, service, retry_on=[500])
    r.start(retryable=retryable, relayed=relayed)
    r.send()
    assert (r.retry(classify.response(500)) is not None) == retried


def test_a_refused_connect_is_resent_elsewhere_at_once(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_a_refused_connect_is_retried_elsewhere; test_unsent: whatever the method, and
    from another hop too, outside retries and max_retries (NO_RETRIES)"""
    r = Request(clock, service, retries=0, max_retries=0)
    r.start(retryable=False, relayed=True)
    r.tries.try_started(clock.now)
    r.tries.state = State.CONNECTING
    assert r.resend(CONNECT_FAILURE)
    r.send(resend=True)
    assert (r.tries.attempt, r.tries.resends) == (1, 1)  # the same try: attempt 1 upstream
    assert (service.retries, service.retries_unsent, service.retrying) == (1, 1, 0)
    assert service.retry_reasons == {"connect-failure": 1}


def test_resends_stop_after_max_resends(clock: FakeClock, service: ServiceState) -> None:
    r = Request(clock, service)
    r.start()
    r.send()
    for _ in range(MAX_RESENDS):
        assert r.resend(RESET)
        r.send(resend=True)
    assert not r.resend(RESET)


def test_a_stalled_try_times_out_and_the_retry_answers(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_a_stalled_try_times_out_and_the_retry_answers: 2000 ms, 1 retry: 1 s a try;
    test_faults' stalled instance: per_try_timeout_ms 300 of 3000"""
    r = Request(clock, service, timeout_ms=2000)
    start = clock.now
    r.start()
    r.send()
    assert r.timer() is Due.TRY_TIMEOUT
    assert clock.now == pytest.approx(start + 1.0)
    assert TIMEOUT.event == 504
    assert r.retry(TIMEOUT) is not None
    assert service.retry_reasons == {"timeout": 1}
    clock.advance(0.010)
    r.send()
    assert r.tries.try_deadline == math.inf  # the route deadline (t + 2 s) comes first
    assert r.tries.next_deadline() == pytest.approx(start + 2.0)

    s = Request(clock, ServiceState("s"), timeout_ms=3000, per_try_timeout_ms=300)
    s.start()
    s.send()
    assert s.tries.next_deadline() == pytest.approx(clock.now + 0.3)


def test_the_budget_caps_retries_and_counts_the_rest(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_the_budget_caps_retries_and_counts_the_rest: ten per ten seconds; test_faults:
    retries stay within 20 % + min_per_s"""
    answers = []
    for _ in range(20):
        r = Request(clock, service, retry_budget={"ratio": 0, "min_per_s": 1})
        r.start()
        r.send()
        answers.append(r.retry(UNAVAILABLE) is not None)
        r.tries.finish()
    assert answers == [True] * 10 + [False] * 10
    assert (service.retries, service.budget.suppressed) == (10, 10)
    clock.advance(10)  # a new window
    r = Request(clock, service, retry_budget={"ratio": 0, "min_per_s": 1})
    r.start()
    r.send()
    assert r.retry(UNAVAILABLE) is not None


def test_the_budget_ratio_follows_requests(clock: FakeClock, service: ServiceState) -> None:
    budget = {"ratio": 0.5, "min_per_s": 0}
    first = Request(clock, service, retry_budget=budget)
    first.start()
    first.send()
    assert first.retry(UNAVAILABLE) is None  # 1 request: half a retry
    second = Request(clock, service, retry_budget=budget)
    second.start()
    second.send()
    assert second.retry(UNAVAILABLE) is not None  # 2 requests: one retry


def test_deadlines_travel_and_are_honoured(clock: FakeClock, service: ServiceState) -> None:
    """test_deadlines_travel_and_are_honoured"""
    r = Request(clock, service)  # 15 s, one retry: 7.5 s a try
    r.start()
    r.send()
    assert r.tries.left_ms(clock.now) == 7500
    assert r.tries.given_ms == 7500  # what the try's head said, as of its start
    clock.advance(0.25)
    assert r.tries.left_ms(clock.now) == 7250

    short = Request(clock, service)  # the caller's own shorter timeout
    short.start(timeout_ms=300)
    short.send()
    assert 299 <= short.tries.left_ms(clock.now) <= 300  # (whole milliseconds, rounded down)
    assert short.tries.given_ms == short.tries.left_ms(clock.now)

    spent = Request(clock, service)  # a deadline already spent: 504 at once, nothing sent
    assert not spent.start(deadline_ms=0)
    assert spent.tries.attempt == 0

    late = Request(clock, service)  # shorter than the route timeout: it ends the wait
    started = clock.now
    late.start(deadline_ms=300)
    late.send()
    assert late.timer() is Due.CALLER_TIMEOUT
    assert clock.now == pytest.approx(started + 0.3)


def test_a_retry_must_fit_in_the_time_left(clock: FakeClock, service: ServiceState) -> None:
    """the caller's 300 ms spent on one try leaves none for a retry"""
    r = Request(clock, service)
    r.start(deadline_ms=300)
    r.send()
    clock.advance(0.29)
    assert r.retry(UNAVAILABLE) is None  # 10 ms left, less than MIN_TRY after the backoff
    assert (service.retries, service.budget.suppressed) == (0, 0)


def test_a_retry_after_is_honoured_only_when_no_other_endpoint_is_free(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_retry_after_keeps_an_endpoint_out: the pause applies to the next try only when
    the endpoint that asked for it is the only one left"""
    r = Request(clock, service, retries=2)
    r.start()
    r.send()
    assert r.tries.retriable(UNAVAILABLE)
    assert r.tries.retry_delay(clock.now, 2.0, lambda: True) == 0.010
    assert r.tries.retry_delay(clock.now, 2.0, lambda: False) == 2.0
    assert r.tries.retry_delay(clock.now, 20.0, lambda: False) is None  # past the deadline


def test_a_relayed_deadline_shortens_the_wait_for_the_head(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_the_callers_deadline_bounds_the_whole_exchange_a_hops_the_head: an app's
    deadline cuts the response body; another hop's only bounds the wait for the head"""
    caller = Request(clock, service)
    started = clock.now
    caller.start(timeout_ms=350)
    caller.send()
    clock.advance(0.1)
    caller.tries.answered()  # the head came: the body follows
    assert caller.timer() is Due.CUT
    assert clock.now == pytest.approx(started + 0.35)

    hop = Request(clock, service)
    started = clock.now
    hop.start(relayed=True, deadline_ms=350)
    hop.send()
    assert hop.tries.next_deadline() == pytest.approx(started + 0.35)
    clock.advance(0.1)
    hop.tries.answered()
    assert hop.timer() is Due.NOTHING  # a stream outlives the route timeout
    assert hop.tries.next_deadline() == math.inf


def test_the_route_timeout_is_504(clock: FakeClock, service: ServiceState) -> None:
    """test_route_timeout_is_504, and a three-hop chain's hop that runs out first"""
    r = Request(clock, service, timeout_ms=200, connect_timeout_ms=100)
    r.start()
    r.send()
    assert r.timer() is Due.TRY_TIMEOUT  # (one retry: 100 ms a try)
    assert r.retry(TIMEOUT) is not None
    clock.advance(0.010)
    r.send()
    assert r.timer() is Due.ROUTE_TIMEOUT
    assert r.tries.timeout == 0.2


def test_the_route_timeout_counts_from_the_end_of_the_request(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_route_timeout_counts_from_the_end_of_the_request: a slow upload longer than the
    timeout is no timeout; the caller's deadline bounds the upload"""
    r = Request(clock, service, timeout_ms=300, connect_timeout_ms=100)
    r.start(request_done=False, has_body=True)
    r.send()
    assert r.tries.next_deadline() == math.inf
    assert r.tries.left_ms(clock.now) == 300  # what the next hop may wait after the body
    assert r.tries.given_ms == 300
    clock.advance(1.0)
    r.tries.request_complete(clock.now)
    assert r.tries.next_deadline() == pytest.approx(clock.now + 0.15)  # the first try's

    upload = Request(clock, service, timeout_ms=300, connect_timeout_ms=100)
    upload.start(request_done=False, has_body=True, timeout_ms=500)
    upload.send()
    assert upload.timer() is Due.UPLOAD_TIMEOUT


def test_an_early_answer_to_an_upload_is_not_retried(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_an_early_response_reaches_a_client_still_uploading: a status before the whole
    request came cannot be replayed; a connect failure can"""
    r = Request(clock, service)
    r.start(request_done=False, has_body=True)
    r.send()
    assert not r.tries.retriable(UNAVAILABLE)
    assert not r.tries.retriable(TIMEOUT)  # (a try out of its time counts as a 504)
    assert r.tries.retriable(RESET)


def test_a_retried_4xx_is_no_failure_of_the_endpoint(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_a_retried_4xx_is_no_failure_of_the_endpoint"""
    limited = classify.response(429)
    assert (limited.failed, limited.pauses) == (False, True)
    r = Request(clock, service, retry_on=[429])
    r.start()
    r.send()
    assert r.retry(limited) is not None


def test_max_retries_limits_requests_retrying_at_once(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_max_retries_limits_sent_retries_and_the_default_lets_callers_leave"""
    requests = [Request(clock, service, max_retries=3) for _ in range(5)]
    delays = []
    for r in requests:
        r.start()
        r.send()
        delays.append(r.retry(RESET))
    assert [d is not None for d in delays] == [True] * 3 + [False] * 2
    assert (service.retrying, service.retries_over_limit) == (3, 2)
    for r in requests:
        r.tries.finish()
    assert service.retrying == 0


def test_a_request_retrying_keeps_its_slot(clock: FakeClock, service: ServiceState) -> None:
    r = Request(clock, service, retries=2, max_retries=1)
    r.start()
    r.send()
    assert r.retry(RESET) is not None
    r.send()
    assert r.retry(RESET) is not None  # its own slot: not over the limit
    assert (service.retrying, service.retries_over_limit) == (1, 0)


# -- hedging ---------------------------------------------------------------------------------


def test_a_hedged_try_answers_for_a_stalled_first_try(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_a_hedged_try_answers_for_a_stalled_first_try"""
    r = Request(clock, service, hedge={"after_ms": 50})
    started = clock.now
    r.start()
    r.send()
    assert r.timer() is Due.HEDGE
    assert clock.now == pytest.approx(started + 0.05)
    assert r.tries.hedge(clock.now, replayable=True, elsewhere=True)
    assert r.tries.state is State.QUEUED
    r.send()
    assert r.tries.attempt == 2  # x-meshlet-attempt: 2
    assert r.tries.hedge_at == math.inf  # only the first try is hedged
    r.tries.hedge_won()
    assert (service.hedges, service.hedges_won) == (1, 1)


def test_a_hedge_that_cannot_be_sent_leaves_the_try_deadline(
    clock: FakeClock, service: ServiceState
) -> None:
    """no other endpoint, no body kept, or no budget: no hedge; the timer goes on"""
    r = Request(clock, service, hedge={"after_ms": 50}, retry_budget={"ratio": 0, "min_per_s": 0})
    r.start()
    r.send()
    assert r.timer() is Due.HEDGE
    assert not r.tries.hedge(clock.now, replayable=True, elsewhere=False)
    assert not r.tries.hedge(clock.now, replayable=False, elsewhere=True)
    assert not r.tries.hedge(clock.now, replayable=True, elsewhere=True)  # the budget
    assert r.tries.on_timer(clock.now) is Due.NOTHING
    assert r.timer() is Due.TRY_TIMEOUT
    assert (service.hedges, service.budget.suppressed) == (0, 1)


def test_a_failed_hedge_leaves_the_first_try_to_answer(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_a_failed_hedge_leaves_the_first_try_to_answer: the hedge's connect is refused;
    no resend while the hedged first try may answer, and no retry (the hedge was the one)"""
    r = Request(clock, service, hedge={"after_ms": 50})
    r.start()
    r.send()
    r.timer()
    assert r.tries.hedge(clock.now, replayable=True, elsewhere=True)
    r.send()
    assert not r.resend(CONNECT_FAILURE, hedged=True)
    assert r.retry(CONNECT_FAILURE) is None


def test_only_requests_that_may_be_retried_are_hedged(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_only_requests_that_may_be_retried_are_hedged: a POST, another hop's try, an
    upgrade"""
    for kw in ({"retryable": False}, {"relayed": True}, {"upgrade": True}):
        r = Request(clock, service, hedge={"after_ms": 50})
        r.start(**kw)
        r.send()
        assert r.tries.hedge_at == math.inf
        assert r.timer() is Due.TRY_TIMEOUT


def test_a_hedge_waits_for_the_end_of_the_request(clock: FakeClock, service: ServiceState) -> None:
    r = Request(clock, service, hedge={"after_ms": 50})
    r.start(request_done=False, has_body=True)
    r.send()
    assert r.tries.hedge_at == math.inf
    clock.advance(1)
    r.tries.request_complete(clock.now)
    assert r.tries.hedge_at == pytest.approx(clock.now + 0.05)


# -- tries none of which was sent (test_unsent) ----------------------------------------------


def test_a_connect_timeout_is_resent_only_with_time_left(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_a_connect_timeout_is_resent_at_once_within_the_time_left: 100 ms connect
    timeout of a 105 ms route leaves 5 ms, less than a try needs"""
    r = Request(clock, service, timeout_ms=105, connect_timeout_ms=100, retries=0)
    r.start()
    r.tries.try_started(clock.now)
    r.tries.state = State.CONNECTING
    clock.advance(0.1)
    assert not r.resend(CONNECT_FAILURE)
    assert r.retry(CONNECT_FAILURE) is None
    assert service.retries == 0


def test_the_budget_bounds_resends(clock: FakeClock, service: ServiceState) -> None:
    """test_the_budget_bounds_resends"""
    r = Request(clock, service, retry_budget={"ratio": 0, "min_per_s": 0})
    r.start()
    r.send()
    assert not r.resend(CONNECT_FAILURE)
    assert (service.retries_unsent, service.budget.suppressed) == (0, 1)


def test_a_resend_after_its_try_deadline_is_bound_by_the_route_deadline(
    clock: FakeClock, service: ServiceState
) -> None:
    """A try resent when less than a try's time is left runs to the route deadline, not to
    the deadline of the try it replaces (which may have passed)."""
    r = Request(clock, service, timeout_ms=2000)  # 1 s a try
    r.start()
    r.send()
    clock.advance(1.5)
    assert r.resend(CONNECT_FAILURE)
    r.send(resend=True)
    assert r.tries.try_deadline == math.inf
    assert r.timer() is Due.ROUTE_TIMEOUT


def test_a_try_resent_right_away_gets_a_whole_try(clock: FakeClock, service: ServiceState) -> None:
    r = Request(clock, service, timeout_ms=2000)
    r.start()
    r.send()
    clock.advance(0.001)
    assert r.resend(CONNECT_FAILURE)
    r.send(resend=True)
    assert r.tries.try_deadline == pytest.approx(clock.now + 1.0)


def test_the_end_of_an_upload_during_a_backoff_only_moves_the_route_deadline(
    clock: FakeClock, service: ServiceState
) -> None:
    """The retry gets its own try deadline when it starts, and is not hedged."""
    r = Request(clock, service, timeout_ms=2000, hedge={"after_ms": 50})
    r.start(request_done=False, has_body=True)
    r.send()
    assert r.retry(CONNECT_FAILURE) is not None
    clock.advance(0.005)
    r.tries.request_complete(clock.now)
    assert (r.tries.try_deadline, r.tries.hedge_at) == (math.inf, math.inf)
    assert r.tries.route_deadline == pytest.approx(clock.now + 2.0)
    clock.advance(0.005)
    r.send()
    assert r.tries.try_deadline == pytest.approx(clock.now + 1.0)
    assert r.tries.hedge_at == math.inf


# -- the inbound route -----------------------------------------------------------------------


def test_the_inbound_route_neither_retries_nor_hedges(
    clock: FakeClock, service: ServiceState
) -> None:
    r = Request(clock, service, relay=True, hedge={"after_ms": 50})
    assert (r.policy.retries, r.policy.per_try, r.policy.hedge) == (0, math.inf, math.inf)
    r.start()
    r.send()
    assert not r.tries.may_retry
    assert r.tries.next_deadline() == pytest.approx(clock.now + 15)


def test_repr_shows_the_state(clock: FakeClock, service: ServiceState) -> None:
    r = Request(clock, service)
    r.start()
    r.send()
    r.retry(RESET)
    assert repr(r.tries) == "<Tries BACKOFF [try 1, 0 resent, retrying]>"


def test_grpc_timeout_is_the_calls_deadline_at_every_hop(
    clock: FakeClock, service: ServiceState
) -> None:
    """test_grpc_timeout_is_the_deadline_of_every_hop: a gRPC call's ``grpc-timeout`` bounds
    the whole call (its streamed answer too) even from another hop, the sooner of it and
    ``x-meshlet-deadline-ms`` wins, and what goes upstream is what is left of it, not the
    route timeout's wait for the head"""
    hop = Request(clock, service, timeout_ms=15_000)
    started = clock.now
    assert hop.start(relayed=True, deadline_ms=900, grpc_ms=400)
    hop.send()
    assert hop.tries.next_deadline() == pytest.approx(started + 0.4)
    clock.advance(0.1)
    assert hop.tries.hard_left_ms(clock.now) in (299, 300)  # (float rounding)
    hop.tries.answered()
    assert hop.timer() is Due.CUT  # mid-stream, at the call's deadline
    assert clock.now == pytest.approx(started + 0.4)

    sooner = Request(clock, service)
    started = clock.now
    sooner.start(deadline_ms=200, grpc_ms=60_000)
    sooner.send()
    assert sooner.tries.left_ms(clock.now) in (199, 200)
    assert sooner.tries.hard_left_ms(clock.now) in (199, 200)
    assert sooner.timer() is Due.CALLER_TIMEOUT
    assert clock.now == pytest.approx(started + 0.2)

    long = Request(clock, service, timeout_ms=1_000)  # a stream longer than the route timeout
    long.start(grpc_ms=60_000)
    long.send()
    assert long.tries.left_ms(clock.now) in (499, 500)  # the first try's wait for the head
    assert long.tries.hard_left_ms(clock.now) in (59_999, 60_000)  # the server's time for the call

    assert not Request(clock, service).start(grpc_ms=0)  # spent: nothing sent


# -- gRPC calls ------------------------------------------------------------------------------

GRPC_UNAVAILABLE = classify.grpc_response(14)


def test_a_grpc_code_retry_on_names_retries_a_call_of_any_method(
    clock: FakeClock, service: ServiceState
) -> None:
    """A gRPC call is a POST: not retryable, yet UNAVAILABLE (listed) retries it; what
    retries an idempotent request only (a reset, a 503) does not."""
    r = Request(clock, service, retry_on=["unavailable", "reset", 503])
    r.start(retryable=False, grpc=True)
    r.send()
    assert not r.tries.retriable(RESET)
    assert not r.tries.retriable(UNAVAILABLE)
    assert not r.tries.retriable(classify.grpc_response(13))  # INTERNAL: not listed
    assert r.retry(GRPC_UNAVAILABLE) == 0.010
    assert service.retry_reasons == {"unavailable": 1}
    clock.advance(0.010)
    r.send()
    assert r.retry(GRPC_UNAVAILABLE) is None  # retries: 1


def test_a_grpc_code_is_not_retried_by_the_default_policy_or_for_another_hop(
    clock: FakeClock, service: ServiceState
) -> None:
    default = Request(clock, service)
    default.start(retryable=False, grpc=True)
    default.send()
    assert default.retry(GRPC_UNAVAILABLE) is None  # retry_on lists no gRPC code
    relayed = Request(clock, service, retry_on=["unavailable"])
    relayed.start(retryable=False, grpc=True, relayed=True)  # the caller's hop retries
    relayed.send()
    assert relayed.retry(GRPC_UNAVAILABLE) is None
    plain = Request(clock, service, retry_on=["unavailable"])
    plain.start(retryable=False)  # not a gRPC call: a code cannot retry it
    plain.send()
    assert plain.retry(GRPC_UNAVAILABLE) is None


def test_a_grpc_answer_before_the_whole_call_came_is_not_retried(
    clock: FakeClock, service: ServiceState
) -> None:
    """A client stream answered UNAVAILABLE while it still sends: nothing whole to replay."""
    r = Request(clock, service, retry_on=["unavailable"])
    r.start(retryable=False, grpc=True, request_done=False, has_body=True)
    r.send()
    assert not r.tries.retriable(GRPC_UNAVAILABLE)
    r.tries.request_complete(clock.now)
    assert r.tries.retriable(GRPC_UNAVAILABLE)


def test_a_grpc_retry_must_fit_in_the_time_left(clock: FakeClock, service: ServiceState) -> None:
    r = Request(clock, service, retry_on=["unavailable"], timeout_ms=1000)
    r.start(retryable=False, grpc=True)
    r.send()
    clock.advance(0.999)
    assert r.retry(GRPC_UNAVAILABLE) is None
