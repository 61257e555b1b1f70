"""A request's tries, decided without I/O: the request's state, its deadlines, and what to do
after each try's outcome (Envoy's ``RetryState``; h11's rule that what moves the state
machine lives in one place).

The exchange (``proxy.exchange``) tells a ``Tries`` what happened (the request reached the
front, a try started, the request's last byte came, a try ended with an ``Outcome``, the
timer rang) with the time of the caller's clock, and does what it answers: retry after a
delay, resend at once, hedge, answer, or give up at a deadline; ``next_deadline`` is when to
wake it next.
Plain values in and out: no sockets, no event loop, no logging, so that tests drive every
branch on a fake clock.

Deadlines, in seconds on that clock (``math.inf``: none):

    route   the route timeout (``timeout_ms``), from the end of the request to the response
            head, across all tries (Envoy's route timeout); never past ``hard``. Once the
            head came, only ``hard`` bounds the body.
    try     each try's (``per_try_timeout_ms``, else ``timeout_ms / (retries + 1)``); a try
            out of its time failed as a 504 would have
    hedge   when the first try, still without a head, is hedged (``hedge.after_ms``)
    hard    the caller's own deadline (``x-meshlet-deadline-ms`` or ``-timeout-ms`` from an
            app); from another hop (``x-meshlet-attempt``) those headers only shorten the
            route timeout, as they are that hop's wait for the head. A gRPC call's
            ``grpc-timeout`` is its hard deadline from any hop (it bounds the whole call)

Retries and resends, and what bounds them, are explained in ``budget``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from typing import Final

from sidecar.resilience.budget import MAX_RESENDS, MIN_TRY, backoff
from sidecar.resilience.classify import Outcome
from sidecar.resilience.service import ServiceState
from sidecar.resilience.trypolicy import UNROUTED, TryPolicy


class State(enum.Enum):
    """Where a request is in its journey."""

    QUEUED = 0  # not started, or between two tries
    CONNECTING = 1  # its try waits for a new connection
    SENT = 2  # its try is on a connection, waiting for the response head
    RESPONDING = 3  # the response head went to the client: its body follows
    TUNNEL = 4  # upgraded (101): bytes both ways
    DONE = 5
    BACKOFF = 6  # between a failed try and the next


# The members as module constants for the hot path: on Python 3.11 each ``State.X`` goes
# through EnumType.__getattr__ (~0.1 us in pure Python; compiled, both are static loads)
QUEUED: Final = State.QUEUED
CONNECTING: Final = State.CONNECTING
SENT: Final = State.SENT
RESPONDING: Final = State.RESPONDING
TUNNEL: Final = State.TUNNEL
DONE: Final = State.DONE
BACKOFF: Final = State.BACKOFF


class Due(enum.Enum):
    """What the timer found due (``Tries.on_timer``)."""

    NOTHING = 0  # wake again at ``next_deadline``
    HEDGE = 1  # hedge the first try; if that cannot be done, ask again
    TRY_TIMEOUT = 2  # the try is out of its time: it failed (``classify``: a 504)
    CUT = 3  # the caller's deadline passed during the response body: cut it
    UPLOAD_TIMEOUT = 4  # the caller's deadline passed during the request body
    CALLER_TIMEOUT = 5  # no response head within the caller's deadline
    ROUTE_TIMEOUT = 6  # no response head within the route timeout


class Tries:
    """One request's state, deadlines and retry decisions."""

    __slots__ = (
        "_backoff",
        "_has_body",
        "attempt",
        "given_ms",
        "hard_deadline",
        "hedge_at",
        "hedging",
        "may_retry",
        "may_retry_grpc",
        "policy",
        "request_done",
        "resends",
        "retrying",
        "route_deadline",
        "service",
        "state",
        "timeout",
        "try_deadline",
    )

    service: ServiceState
    """whose budget and counters the tries use (from ``start``)"""

    def __init__(self, *, backoff: Callable[[int], float] = backoff) -> None:
        self.policy = UNROUTED
        self._backoff = backoff
        self.state = QUEUED
        self.request_done = False
        self._has_body = False
        #: tries started (a try resent because none of it went out stays the same try)
        self.attempt = 0
        #: tries resent elsewhere because none of them went out
        self.resends = 0
        self.may_retry = False
        #: a gRPC call, retried for the codes ``retry_on`` names whatever its method
        self.may_retry_grpc = False
        self.hedging = False
        #: counted in the service's ``retrying`` (``max_retries``) until the request ends
        self.retrying = False
        #: seconds: the wait for the response head, from the end of the request
        self.timeout = 0.0
        self.hard_deadline = math.inf
        self.route_deadline = math.inf
        self.try_deadline = math.inf
        self.hedge_at = math.inf
        #: ``left_ms`` as of the current try's start: what its head gives the next hop
        self.given_ms = 0

    def __repr__(self) -> str:
        return (
            f"<Tries {self.state.name} [try {self.attempt}, {self.resends} resent"
            f"{', retrying' if self.retrying else ''}]>"
        )

    # -- the request ----------------------------------------------------------------------

    def start(
        self,
        now: float,
        policy: TryPolicy,
        service: ServiceState,
        request_done: bool,
        has_body: bool,
        retryable: bool,
        upgrade: bool = False,
        relayed: bool = False,
        timeout_ms: int | None = None,
        deadline_ms: int | None = None,
        grpc_ms: int | None = None,
        grpc: bool = False,
    ) -> bool:
        """The request reached the front and was routed to a service with ``policy``.
        ``retryable``: idempotent, or asked to be retried; ``grpc``: a gRPC call, which a
        gRPC code that ``retry_on`` names retries even when it is not ``retryable`` (a
        server's UNAVAILABLE says the call may be made again: gRPC's own retry policy
        retries by code, not by method);
        ``relayed``: an earlier hop's try (``x-meshlet-attempt``), retried there, not here;
        ``timeout_ms`` and ``deadline_ms``: its deadline headers; ``grpc_ms``: its
        ``grpc-timeout``, a gRPC call's own deadline from whichever hop. False: the caller's
        deadline is already spent (answer 504, send nothing)."""
        if deadline_ms is not None and deadline_ms <= 0:
            return False
        if grpc_ms is not None:
            if grpc_ms <= 0:
                return False
            self.hard_deadline = now + grpc_ms / 1000
        self.policy = policy
        self.service = service
        self.request_done = request_done
        self._has_body = has_body
        timeout = policy.timeout
        if timeout_ms is not None or deadline_ms is not None:  # (most requests have neither)
            # (a relayed hop's tested one by one, not in a loop with min(): every request to
            # an inbound sidecar has them, and in pure Python those calls cost the most here)
            if relayed:  # that hop's wait for the head: it shortens this one
                if timeout_ms is not None and timeout_ms / 1000 < timeout:
                    timeout = timeout_ms / 1000
                if deadline_ms is not None and deadline_ms / 1000 < timeout:
                    timeout = deadline_ms / 1000
            else:  # the caller's own: it bounds everything, the body included
                for ms in (timeout_ms, deadline_ms):
                    if ms is not None:
                        self.hard_deadline = min(self.hard_deadline, now + ms / 1000)
        self.timeout = timeout
        if has_body and not request_done:  # the wait for the head starts at its end
            self.route_deadline = self.hard_deadline
        else:  # (min(), inline: the builtin's call costs more than the rest, in pure Python)
            hard = self.hard_deadline
            self.route_deadline = hard if hard < now + timeout else now + timeout
        service.budget.request(now)
        again = retryable and not relayed
        self.may_retry = again and policy.retries > 0
        self.may_retry_grpc = grpc and not relayed and policy.retries > 0
        self.hedging = again and policy.hedge < math.inf and not upgrade
        return True

    def try_started(self, now: float, resend: bool = False) -> float:
        """A try is on its way (``resend``: the last one again, none of which went out).
        Returns when the timer must ring next (``next_deadline``, inline: once a try), and
        sets ``given_ms``."""
        if not resend:
            self.attempt += 1
        per_try = self.policy.per_try
        at = self.route_deadline
        if self.request_done and per_try < at - now:
            self.try_deadline = at = now + per_try  # (before the route's: it rings first)
        else:  # (the route deadline comes first, or the try's starts with the request's end)
            self.try_deadline = math.inf
        left = at - now  # (``left_ms``, inline: once a try; ``at`` is the sooner deadline)
        if not self.request_done and self.timeout < left:
            left = self.timeout
        self.given_ms = int(left * 1000) if left > 0 else 0
        if self.hedging and self.attempt == 1 and self.request_done:
            self.hedge_at = now + self.policy.hedge
        return self.hedge_at if self.hedge_at < at else at

    def request_complete(self, now: float) -> bool:
        """The request's body ended: the wait for the response head counts from here (as
        Envoy's route timeout), and so do the first try's timeout and its hedge. True when
        that moved a deadline."""
        self.request_done = True
        state = self.state
        if not self._has_body or not (state is SENT or state is CONNECTING or state is BACKOFF):
            return False  # (a request without a body ended where it started)
        hard = self.hard_deadline  # (min(), inline)
        self.route_deadline = hard if hard < now + self.timeout else now + self.timeout
        if state is BACKOFF or self.attempt != 1:
            return True  # the next try's own time starts with it
        per_try = self.policy.per_try
        if per_try < self.route_deadline - now:
            self.try_deadline = now + per_try
        if self.hedging:
            self.hedge_at = now + self.policy.hedge
        return True

    def answered(self) -> None:
        """A response head went to the client: no try or hedge deadline any more."""
        self.state = RESPONDING
        self.try_deadline = math.inf
        self.hedge_at = math.inf

    def left_ms(self, now: float) -> int:
        """What the next hop may spend (``x-meshlet-deadline-ms``): this try's time left, so
        that it gives up when this hop does; while the body still comes, at most the route
        timeout (the wait for the head starts at its end)."""
        route, try_ = self.route_deadline, self.try_deadline  # (min(), inline)
        left = (try_ if try_ < route else route) - now
        if not self.request_done and self.timeout < left:
            left = self.timeout
        return int(left * 1000) if left > 0 else 0

    def hard_left_ms(self, now: float) -> int:
        """What is left of the caller's own deadline (``grpc-timeout`` sent upstream): a
        gRPC deadline bounds the whole call, its streamed messages too, so the server is
        given what this hop gives it at most, not the wait for the head that
        ``left_ms`` is (an abandoned try's stream is cancelled, its server told so)."""
        left = self.hard_deadline - now
        if left == math.inf:
            left = self.timeout
        return int(left * 1000) if left > 0 else 0

    def next_deadline(self) -> float:
        """When the timer must ring next: the route's, the try's or the hedge's deadline."""
        at = self.route_deadline
        if self.try_deadline < at:
            at = self.try_deadline
        if self.hedge_at < at:
            at = self.hedge_at
        return at

    def on_timer(self, now: float, *, hedged: bool = False) -> Due:
        """The timer rang (``hedged``: a hedged first try is still waiting)."""
        state = self.state
        if now < self.route_deadline:
            if now >= self.hedge_at:
                self.hedge_at = math.inf
                if state is SENT and not hedged:
                    return Due.HEDGE
            if now >= self.try_deadline and (state is SENT or state is CONNECTING):
                return Due.TRY_TIMEOUT
            return Due.NOTHING
        if state is RESPONDING:
            if now < self.hard_deadline:  # the body: only the caller's deadline bounds it
                self.route_deadline = self.hard_deadline
                return Due.NOTHING
            return Due.CUT
        if not self.request_done:
            return Due.UPLOAD_TIMEOUT
        if now >= self.hard_deadline:
            return Due.CALLER_TIMEOUT
        return Due.ROUTE_TIMEOUT

    # -- after a try failed ---------------------------------------------------------------

    def try_abandoned(self) -> None:
        """The current try is given up: only a first try is hedged."""
        self.hedge_at = math.inf

    def may_resend(self, now: float, *, hedged: bool = False) -> bool:
        """A try none of which went out may go to another endpoint at once: not while a
        hedged try may still answer, at most ``MAX_RESENDS`` times, with time left for it."""
        if hedged or self.resends >= MAX_RESENDS:
            return False
        return self.route_deadline - now >= MIN_TRY

    def resend(self, now: float, outcome: Outcome) -> bool:
        """Take a resend from the budget (the caller found another endpoint); False: the
        budget refused, the failure is the answer."""
        service = self.service
        if not service.budget.spend(now, self.policy.budget_ratio, self.policy.budget_min_per_s):
            return False
        self.resends += 1
        service.retries += 1
        service.retries_unsent += 1
        self._count(outcome.label)
        return True

    def retriable(self, outcome: Outcome) -> bool:
        """Whether the policy retries a try that ended so (if the request's body was kept
        for another try); ``retry_delay`` says if it fits."""
        answered = outcome.grpc_status >= 0
        if not self.may_retry and not (answered and self.may_retry_grpc):
            return False
        policy = self.policy
        if outcome.event not in policy.retry_on or self.attempt > policy.retries:
            return False
        # answered before the whole request came: nothing to replay yet
        return self.request_done or not (answered or isinstance(outcome.event, int))

    def listed(self, outcome: Outcome) -> bool:
        """``retry_on`` names the outcome: while a hedged first try waits, such an answer
        of either try loses to the other's."""
        return outcome.event in self.policy.retry_on

    def retry_delay(
        self,
        now: float,
        retry_after: float | None = None,
        elsewhere: Callable[[], bool] | None = None,
    ) -> float | None:
        """Seconds to wait before retrying a ``retriable`` try, or None: no retry (it would
        not fit in the time left, ``max_retries`` are retrying, or the budget refused).
        ``retry_after``: the pause the failed endpoint asked for, honoured when no other
        endpoint is available (``elsewhere``)."""
        delay = self._backoff(self.attempt)
        if retry_after is not None and (elsewhere is None or not elsewhere()):
            delay = max(delay, retry_after)
        if self.route_deadline - now - delay < MIN_TRY:
            return None
        service, policy = self.service, self.policy
        if not self.retrying and service.retrying >= policy.max_retries:
            service.retries_over_limit += 1
            return None
        if not service.budget.spend(now, policy.budget_ratio, policy.budget_min_per_s):
            return None
        return delay

    def begin_backoff(self, outcome: Outcome) -> None:
        """A retry was decided: wait for it (holding a ``max_retries`` slot until the end)."""
        self.state = BACKOFF
        self.try_deadline = math.inf
        service = self.service
        if not self.retrying:
            self.retrying = True
            service.retrying += 1
        service.retries += 1
        self._count(outcome.label)

    def _count(self, label: str) -> None:
        reasons = self.service.retry_reasons
        reasons[label] = reasons.get(label, 0) + 1

    # -- hedging --------------------------------------------------------------------------

    def hedge(self, now: float, *, replayable: bool, elsewhere: bool) -> bool:
        """Whether to hedge now (``on_timer`` said HEDGE): the body was kept, another
        endpoint is available, and the budget has a try; the first try waits on."""
        if not replayable or not elsewhere:
            return False
        policy = self.policy
        if not self.service.budget.spend(now, policy.budget_ratio, policy.budget_min_per_s):
            return False
        self.service.hedges += 1
        self.state = QUEUED
        self.try_deadline = math.inf
        return True

    def hedge_won(self) -> None:
        self.service.hedges_won += 1

    # -- the end --------------------------------------------------------------------------

    def stop_retrying(self) -> None:
        """No retry is under way any more (the request ends, or a hedged try answered)."""
        if self.retrying:
            self.retrying = False
            self.service.retrying -= 1

    def finish(self) -> None:
        self.state = DONE
        if self.retrying:
            self.stop_retrying()
