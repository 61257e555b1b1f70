"""Outlier ejection and half-open probes as a state machine on a fake clock."""

from __future__ import annotations

import math

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from control_plane.wire import Endpoint, Outlier
from sidecar.balancing import outlier
from sidecar.balancing.balancer import Member
from sidecar.balancing.ewma import EndpointStats, Exclusions, Phase
from sidecar.clock import FakeClock

CONFIG = Outlier(
    consecutive_failures=3,
    base_ejection_ms=1000,
    max_ejection_percent=50,
    failure_rate_percent=50,
    failure_rate_min_requests=6,
    max_ejection_ms=4000,
)


def phase(m: Member) -> Phase:
    return m.stats.ejection.phase if m.stats.ejection else Phase.HEALTHY


class Ejections(RuleBasedStateMachine):
    """The exchange's side, simplified: a try goes to an available endpoint (or, in panic, to
    any), a picked ejected endpoint becomes a probe, the try's outcome is recorded."""

    @initialize(n=st.integers(1, 6))
    def start(self, n: int) -> None:
        self.clock = FakeClock()
        shared = Exclusions()
        self.members = [
            Member(Endpoint("10.0.0.1", 1000 + i), EndpointStats(self.clock.monotonic(), shared))
            for i in range(n)
        ]
        self.ejected_at: dict[int, float] = {}

    def _outcome(self, i: int, failed: bool) -> None:
        m = self.members[i]
        now = self.clock.monotonic()
        before = phase(m)
        if before is Phase.EJECTED and m.stats.excluded_until > now:
            return  # not picked while out (panic picks are the probe case below)
        if before is Phase.EJECTED:
            outlier.probe(m.stats)
            assert phase(m) is Phase.PROBING
            assert m.stats.excluded_until == math.inf
        ejected = outlier.record(m.stats, failed, now, CONFIG, self.members, "svc")
        after = phase(m)
        if ejected:
            assert after is Phase.EJECTED
            e = m.stats.ejection
            assert e is not None
            expected = min(CONFIG.base_ejection_ms * e.times, CONFIG.max_ejection_ms) / 1000
            assert m.stats.excluded_until == now + expected
            if before is Phase.PROBING or before is Phase.EJECTED:
                assert failed  # a failed probe ejects again
        elif before in (Phase.PROBING, Phase.EJECTED):
            assert not failed
            assert after is Phase.HEALTHY  # a probe that succeeds restores
            assert m.stats.excluded_until <= now

    @rule(i=st.integers(0, 5))
    def success(self, i: int) -> None:
        self._outcome(i % len(self.members), failed=False)

    @rule(i=st.integers(0, 5))
    def failure(self, i: int) -> None:
        self._outcome(i % len(self.members), failed=True)

    @rule(i=st.integers(0, 5))
    def probe_abandoned(self, i: int) -> None:
        m = self.members[i % len(self.members)]
        now = self.clock.monotonic()
        if phase(m) is Phase.EJECTED and m.stats.excluded_until <= now:
            outlier.probe(m.stats)
            outlier.abandon(m.stats, now)
            assert phase(m) is Phase.EJECTED
            assert m.stats.excluded_until <= now  # the next request probes

    @rule(seconds=st.sampled_from([0.1, 0.5, 1.0, 2.5, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def at_most_the_percentage_out_but_one_always_can_be(self) -> None:
        if not hasattr(self, "members"):
            return
        out = sum(1 for m in self.members if phase(m) is not Phase.HEALTHY)
        assert out <= max(1, math.floor(len(self.members) * CONFIG.max_ejection_percent / 100))

    @invariant()
    def healthy_endpoints_are_not_excluded_by_ejection(self) -> None:
        if not hasattr(self, "members"):
            return
        for m in self.members:
            if phase(m) is Phase.HEALTHY:
                assert m.stats.excluded_until != math.inf


TestEjections = Ejections.TestCase


def test_five_in_a_row_then_probe_then_restore() -> None:
    clock, shared = FakeClock(), Exclusions()
    config = Outlier()
    ms = [
        Member(Endpoint("10.0.0.1", 1000 + i), EndpointStats(clock.monotonic(), shared))
        for i in range(4)
    ]
    bad = ms[0].stats
    for n in range(1, 6):
        ejected = outlier.record(bad, True, clock.monotonic(), config, ms, "svc")
        assert ejected is (n == 5)
    assert bad.excluded_until == clock.monotonic() + 30
    clock.advance(30)
    outlier.probe(bad)
    assert outlier.record(bad, True, clock.monotonic(), config, ms, "svc")  # probe fails
    assert bad.excluded_until == clock.monotonic() + 60  # longer: 30 s x 2
    clock.advance(60)
    outlier.probe(bad)
    assert not outlier.record(bad, False, clock.monotonic(), config, ms, "svc")
    assert phase(ms[0]) is Phase.HEALTHY
    assert bad.excluded_until == 0


def test_failure_rate_ejects_an_endpoint_that_fails_every_other_time() -> None:
    clock, shared = FakeClock(), Exclusions()
    config = Outlier()
    ms = [
        Member(Endpoint("10.0.0.1", 1000 + i), EndpointStats(clock.monotonic(), shared))
        for i in range(4)
    ]
    flaky = ms[1].stats
    ejected = [
        outlier.record(flaky, n % 2 == 0, clock.monotonic(), config, ms, "svc") for n in range(40)
    ]
    assert ejected.index(True) == 20  # 11 failures of 21 requests, the first time it counts
