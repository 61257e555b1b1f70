"""Expiry and protection as a plain function over instance ages."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from control_plane.reaper import PROTECT_MIN, ExpiryPlan, plan_expiry


def plan(ages: dict[str, float], protect: float = 15) -> ExpiryPlan[str]:
    return plan_expiry(ages, ttl=15, remove_after=30, protect_percent=protect)


def test_fresh_instances_stay() -> None:
    p = plan({"a": 0, "b": 14.9, "c": 15.0})
    assert (p.lapsed, p.removed, p.protection) == ((), (), False)


def test_lone_dead_instance_lapses_then_is_removed() -> None:
    healthy = {f"h{i}": 1.0 for i in range(9)}
    assert plan({**healthy, "dead": 16}).lapsed == ("dead",)
    p = plan({**healthy, "dead": 31})
    assert (p.lapsed, p.removed, p.protection) == ((), ("dead",), False)


def test_many_lapsing_at_once_turns_on_protection() -> None:
    ages = {f"h{i}": 1.0 for i in range(7)} | {"x": 40, "y": 40, "z": 20}
    p = plan(ages)  # 3 of 10 = 30% > 15%
    assert p.protection is True
    assert (p.lapsed, p.removed) == ((), ())


def test_two_lapsed_never_protect_however_small_the_registry() -> None:
    p = plan({"a": 40, "b": 40, "c": 1})
    assert p.protection is False
    assert set(p.removed) == {"a", "b"}


def test_percent_is_of_all_instances() -> None:
    ages = {f"h{i}": 1.0 for i in range(97)} | {"x": 40, "y": 40, "z": 40}
    assert plan(ages).protection is False  # 3% <= 15%
    assert plan(ages, protect=2).protection is True  # 3% > 2%


def test_protect_percent_100_turns_protection_off() -> None:
    p = plan({"a": 40, "b": 40, "c": 40}, protect=100)
    assert p.protection is False
    assert len(p.removed) == 3


def test_draining_instances_are_left_out_of_protection() -> None:
    ages = {f"h{i}": 1.0 for i in range(7)} | {"d1": 40, "d2": 40, "d3": 20}
    p = plan_expiry(ages, ttl=15, remove_after=30, protect_percent=15, draining={"d1", "d2", "d3"})
    assert p.protection is False
    assert (set(p.removed), p.lapsed) == ({"d1", "d2"}, ("d3",))
    held = plan_expiry(
        ages | {"x": 40, "y": 40, "z": 40},
        ttl=15,
        remove_after=30,
        protect_percent=15,
        draining={"d1", "d2", "d3"},
    )
    assert held.protection is True
    assert (held.late, held.counted) == (3, 10)
    assert set(held.removed) == {"d1", "d2"}  # a drained instance still goes


def test_instances_that_never_heartbeated_neither_count_nor_are_held() -> None:
    ages = {f"h{i}": 1.0 for i in range(7)} | {"j1": 40, "j2": 40, "j3": 20}
    p = plan_expiry(ages, ttl=15, remove_after=30, protect_percent=15, unproven={"j1", "j2", "j3"})
    assert p.protection is False
    assert (set(p.removed), p.lapsed, p.counted) == ({"j1", "j2"}, ("j3",), 7)


def test_release_lets_the_oldest_held_instances_go() -> None:
    ages = {f"h{i}": 1.0 for i in range(5)} | {"x": 400, "y": 900, "z": 20}
    p = plan_expiry(ages, ttl=15, remove_after=30, protect_percent=15, release=2)
    assert p.protection is True
    assert (p.released, p.removed, p.lapsed) == (("y", "x"), ("x", "y"), ())


@given(
    st.dictionaries(st.integers(0, 200), st.floats(0, 100), max_size=60),
    st.floats(0, 100),
    st.sets(st.integers(0, 200)),
    st.sets(st.integers(0, 200)),
    st.integers(0, 5),
)
def test_plan_properties(
    ages: dict[int, float], protect: float, draining: set[int], unproven: set[int], release: int
) -> None:
    p = plan_expiry(
        ages,
        ttl=15,
        remove_after=30,
        protect_percent=protect,
        draining=draining,
        unproven=unproven,
        release=release,
    )
    counted = [k for k in ages if k not in draining and k not in unproven]
    late = [k for k in counted if ages[k] > 15]
    assert (p.late, p.counted) == (len(late), len(counted))
    everything_late = {k for k, age in ages.items() if age > 15}
    if p.protection:
        assert len(late) >= PROTECT_MIN
        assert len(late) * 100 > protect * len(counted)
        assert len(p.released) == min(release, len(late))
        assert set(p.released) <= set(late)
        held = set(late) - set(p.released)
        assert all(ages[k] <= ages[r] for k in held for r in p.released)  # oldest go first
        assert set(p.lapsed) | set(p.removed) == everything_late - held
    else:
        assert p.released == ()
        assert set(p.lapsed) | set(p.removed) == everything_late
    assert not set(p.lapsed) & set(p.removed)
    assert all(ages[k] > 30 for k in p.removed)
