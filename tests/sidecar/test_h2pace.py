"""A stream's pace on its own: its silence and its request body's rate, on the time given."""

from __future__ import annotations

import math

from sidecar.proxy.h2pace import Due, StreamPace
from sidecar.proxy.limits import MinRate


def test_a_body_below_the_rate_is_due_after_the_grace() -> None:
    pace = StreamPace(MinRate(bytes_per_s=100, grace=1.0), idle=60.0, now=0.0)
    assert pace.next_at(counting=True) == 1.0
    assert pace.due(0.9, counting=True) is Due.NOTHING
    pace.body(0.9, 150)  # 150 bytes: good until 1.5 s
    assert pace.next_at(counting=True) == 1.5
    assert pace.due(1.2, counting=True) is Due.NOTHING
    assert pace.due(1.5, counting=True) is Due.SLOW_BODY
    # held up by the sidecar, or whole: the rate does not count
    assert pace.due(1.5, counting=False) is Due.NOTHING
    assert pace.next_at(counting=False) == 0.9 + 60.0


def test_the_rate_counts_again_from_a_resume() -> None:
    pace = StreamPace(MinRate(bytes_per_s=100, grace=1.0), idle=0.0, now=0.0)
    pace.resumed(10.0)
    assert pace.next_at(counting=True) == 11.0
    assert pace.due(10.5, counting=True) is Due.NOTHING


def test_silence_either_way_is_due_after_the_idle_timeout() -> None:
    pace = StreamPace(MinRate(bytes_per_s=0), idle=5.0, now=0.0)
    pace.moved(3.0)  # a byte of the response
    assert pace.next_at(counting=True) == 8.0
    assert pace.due(7.9, counting=True) is Due.NOTHING
    assert pace.due(8.0, counting=True) is Due.SILENT
    off = StreamPace(MinRate(bytes_per_s=0), idle=0.0, now=0.0)
    assert off.next_at(counting=True) == math.inf
    assert off.due(1e9, counting=True) is Due.NOTHING
