"""Client limits as plain decisions: the minimum data rate, admission, descriptors."""

from __future__ import annotations

import math

import pytest

from sidecar.errors import ConfigError
from sidecar.proxy.limits import (
    FD_RESERVE,
    Admission,
    ListenerCounters,
    ListenerLimits,
    MinRate,
    connections_that_fit,
)


def test_a_rate_gives_a_grace_then_asks_for_bytes_per_second() -> None:
    rate = MinRate(bytes_per_s=240, grace=5)
    assert rate.deadline(100.0, 0) == 105.0  # nothing yet: due at the end of the grace
    assert rate.deadline(100.0, 1200) == 105.0  # 5 s of credit: still the grace
    assert rate.deadline(100.0, 2400) == 110.0  # credit beyond it: 10 s at 240 bytes/s
    assert MinRate(bytes_per_s=0).deadline(100.0, 0) == math.inf  # off


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"bytes_per_s": -1}, "min_data_rate"),
        ({"grace": -0.1}, "data_rate_grace"),
    ],
)
def test_a_rate_refuses_nonsense(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError) as e:
        MinRate(**kwargs)
    assert e.value.field == field


def test_listener_limits_refuse_nonsense() -> None:
    with pytest.raises(ConfigError, match="max_connections"):
        ListenerLimits(max_connections=0)
    with pytest.raises(ConfigError, match="source_share"):
        ListenerLimits(source_share=1.5)
    assert ListenerLimits(source_share=0.5).per_source(1024) == 512
    assert ListenerLimits(source_share=0.0001).per_source(1024) == 1  # never none


def test_admission_counts_the_listener_and_each_source() -> None:
    counters = ListenerCounters()
    admission = Admission(ListenerLimits(max_connections=4, source_share=0.5), counters)
    a1 = admission.admit(b"10.0.0.1")
    a2 = admission.admit(b"10.0.0.1")
    assert a1[0]
    assert a2 == a1
    assert admission.admit(b"10.0.0.1") == (False, None)  # its share: 2 of 4
    assert counters.refused_source_connections == 1
    b1 = admission.admit(b"10.0.0.2")
    b2 = admission.admit(b"10.0.0.2")
    assert b1[0]
    assert b2 == b1
    assert admission.admit(b"10.0.0.3") == (False, None)  # the listener is full
    assert counters.refused_max_connections == 1
    for _, source in (a1, a2, b1):
        admission.release(source)
    assert admission.sources() == 1  # 10.0.0.1 has none left: forgotten
    assert admission.admit(b"10.0.0.3")[0]
    assert repr(admission) == "<Admission [2 of 4 connections, 2 sources]>"


def test_without_a_share_sources_are_not_counted() -> None:
    admission = Admission(ListenerLimits(max_connections=2), ListenerCounters())
    assert admission.admit(b"127.0.0.1") == (True, None)
    assert admission.admit(b"127.0.0.1") == (True, None)
    assert admission.admit(b"127.0.0.1") == (False, None)
    assert admission.sources() == 0


def test_connections_fit_the_descriptors() -> None:
    assert connections_that_fit(10_000, 1 << 20) == 10_000
    assert connections_that_fit(10_000, 1024) == (1024 - FD_RESERVE) // 4
    assert connections_that_fit(10_000, 10) == 1
