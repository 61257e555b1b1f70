"""Smooth weighted round robin."""

from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from control_plane.wire import Endpoint
from sidecar.balancer import RoundRobin


def endpoints(weights: list[int]) -> list[Endpoint]:
    return [Endpoint("10.0.0.1", 1000 + i, weight=w) for i, w in enumerate(weights)]


def test_no_endpoints_and_one() -> None:
    assert RoundRobin([]).pick() is None
    (only,) = endpoints([5])
    assert [RoundRobin([only]).pick() for _ in range(3)] == [only] * 3


def test_interleaves_rather_than_bursts() -> None:
    a, b, c = endpoints([5, 1, 1])
    rr = RoundRobin([a, b, c])
    picks = [rr.pick() for _ in range(7)]
    assert picks == [a, a, b, a, c, a, a]  # nginx's documented sequence for 5:1:1
    assert repr(rr) == "<RoundRobin [3 endpoints, total weight 7]>"


@given(st.lists(st.integers(1, 50), min_size=1, max_size=8), st.integers(1, 3))
def test_every_cycle_is_exact(weights: list[int], cycles: int) -> None:
    eps = endpoints(weights)
    rr = RoundRobin(eps)
    picks = Counter(rr.pick() for _ in range(sum(weights) * cycles))
    assert picks == {e: e.weight * cycles for e in eps}
