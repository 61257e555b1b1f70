"""The retry budget over a fake clock, and the backoff's bounds."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from sidecar.resilience.budget import BACKOFF_BASE, BACKOFF_CAP, WINDOW, Budget, backoff


def test_the_floor_allows_min_per_s_times_the_window() -> None:
    budget = Budget()
    now = 100.0
    allowed = sum(budget.spend(now, ratio=0.2, min_per_s=1) for _ in range(20))
    assert allowed == 10  # 1/s x 10 s, no requests yet
    assert budget.suppressed == 10


def test_the_ratio_follows_requests_over_ten_seconds() -> None:
    budget = Budget()
    for second in range(10):
        for _ in range(100):
            budget.request(1000.0 + second)
    now = 1009.5
    allowed = sum(budget.spend(now, ratio=0.2, min_per_s=0) for _ in range(300))
    assert allowed == 200  # 20 % of 1,000 requests
    # a second on, the first second's 100 requests left the window: 20 % of 900 < 200 spent
    assert budget.spend(now + 1, ratio=0.2, min_per_s=0) is False
    later = 1030.0  # and twenty seconds on, everything has
    assert budget.spend(later, ratio=0.2, min_per_s=0) is False  # no requests, no floor
    budget.request(later)
    for _ in range(4):
        budget.request(later)
    assert budget.spend(later, ratio=0.2, min_per_s=0) is True  # 20 % of 5 = 1
    assert budget.spend(later, ratio=0.2, min_per_s=0) is False


@given(st.lists(st.tuples(st.floats(0, 30), st.booleans()), max_size=300))
def test_retries_never_exceed_the_budget_in_any_window(events: list[tuple[float, bool]]) -> None:
    budget = Budget()
    now = 5000.0
    history: list[tuple[float, bool]] = []  # (time, retry allowed?) of requests and retries
    for step, is_retry in events:
        now += step / 10
        if is_retry:
            if budget.spend(now, ratio=0.5, min_per_s=1):
                history.append((now, True))
        else:
            budget.request(now)
            history.append((now, False))
        # in the buckets the budget looks at (the last 10 whole seconds)
        oldest = int(now) - WINDOW
        requests = sum(1 for t, r in history if not r and int(t) > oldest)
        retries = sum(1 for t, r in history if r and int(t) > oldest)
        assert retries <= 0.5 * requests + 1 * WINDOW


@given(st.integers(1, 20))
def test_backoff_is_full_jitter_capped(n: int) -> None:
    for _ in range(20):
        delay = backoff(n)
        assert 0 <= delay <= min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (n - 1))
