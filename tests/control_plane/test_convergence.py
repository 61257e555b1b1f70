"""Push convergence on a fake clock: from a registry change to the last ACK of its table."""

from __future__ import annotations

from control_plane.convergence import Convergence


class Setup:
    def __init__(self, limit: int = 64) -> None:
        self.now = 100.0
        self.observed: list[float] = []
        self.c = Convergence(lambda: self.now, limit=limit)
        self.c.on_converged(self.observed.append)

    @property
    def seen(self) -> list[float]:
        return [round(x, 6) for x in self.observed]

    def change_and_publish(self, version: int, sidecars: set[int]) -> None:
        self.c.changed()
        self.now += 0.1  # the debounce
        self.c.published(version, self.c.take(), sidecars)


def test_the_clock_stops_at_the_last_ack() -> None:
    s = Setup()
    s.change_and_publish(2, {1, 2})
    s.now += 0.05
    s.c.acked(1, 2)
    assert s.seen == []
    s.now += 0.2
    s.c.acked(2, 2)
    assert s.seen == [0.35]
    s.c.acked(2, 2)  # a repeated ACK is not measured again
    assert len(s.seen) == 1


def test_a_newer_ack_covers_older_versions() -> None:
    s = Setup()
    s.change_and_publish(2, {1})
    s.now += 1
    s.change_and_publish(3, {1})  # the sidecar skipped 2: it only ever gets the newest
    s.now += 1
    s.c.acked(1, 3)
    assert s.seen == [2.2, 1.1]
    assert "0 versions awaiting" in repr(s.c)


def test_changes_in_one_debounce_window_are_timed_from_the_first() -> None:
    s = Setup()
    s.c.changed()
    s.now += 0.08
    s.c.changed()
    s.now += 0.1
    s.c.published(2, s.c.take(), {1})
    s.c.acked(1, 2)
    assert s.seen == [0.18]


def test_a_failed_build_keeps_the_first_change() -> None:
    s = Setup()
    s.c.changed()
    since = s.c.take()
    s.now += 1
    s.c.changed()  # while the store write was failing
    s.c.restore(since)
    s.c.published(2, s.c.take(), {1})
    s.c.acked(1, 2)
    assert s.seen == [1.0]


def test_nothing_to_measure() -> None:
    s = Setup()
    s.c.published(1, s.c.take(), {1})  # no change: the start-up table
    s.change_and_publish(2, set())  # no sidecar needed it
    s.c.acked(1, 2)
    assert s.seen == []


def test_a_refusing_or_leaving_sidecar_is_not_waited_for() -> None:
    s = Setup()
    s.change_and_publish(2, {1, 2, 3})
    s.c.acked(1, 2)
    s.now += 5
    s.c.refused(2, 2)
    assert s.seen == []
    s.c.gone(3)  # the clock stopped at the last ACK that came, not at the leaving
    assert s.seen == [0.1]
    s.change_and_publish(3, {2})
    s.c.refused(2, 3)  # every sidecar refused it: it never converged
    assert len(s.seen) == 1


def test_a_refusal_leaves_newer_versions_awaited() -> None:
    s = Setup()
    s.change_and_publish(2, {1})
    s.change_and_publish(3, {1})
    s.c.refused(1, 2)
    assert s.seen == []
    s.c.acked(1, 3)
    assert s.seen == [0.1]


def test_memory_is_bounded_when_a_sidecar_never_answers() -> None:
    s = Setup(limit=3)
    for version in range(2, 12):
        s.change_and_publish(version, {1, 2})
        s.c.acked(1, version)
    assert "3 versions awaiting" in repr(s.c)
    s.c.acked(2, 11)
    assert len(s.seen) == 3
