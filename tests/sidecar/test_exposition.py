"""The sidecar's own Prometheus text writer: byte for byte what prometheus-client writes for the
same families (the control plane still uses it, so it is here to compare against), escaping
included; and the process_* metrics read from /proc."""

from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.parser import text_string_to_metric_families

from sidecar.admin.exposition import CHUNK, chunks, counter, gauge, go_float, histogram, render
from sidecar.admin.process import ProcessMetrics

AWKWARD = ["plain", "back\\slash", 'a "quoted" one', "two\nlines", "", "ünïcode"]


class Theirs:
    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> list[Metric]:
        return self.metrics


def theirs(*metrics: Metric) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Theirs(list(metrics)))
    return generate_latest(registry)


def test_counters_and_gauges_with_awkward_labels_and_help() -> None:
    help_text = "with a back\\slash and a\nnewline"
    ours_c = counter("meshlet_things", help_text, labels=["zone", "name"])
    their_c = CounterMetricFamily("meshlet_things", help_text, labels=["zone", "name"])
    ours_g = gauge("meshlet_level", "a gauge", labels=["name"])
    their_g = GaugeMetricFamily("meshlet_level", "a gauge", labels=["name"])
    for i, value in enumerate(AWKWARD):
        ours_c.add(["z", value], i)
        their_c.add_metric(["z", value], i)
        ours_g.add([value], i / 3)
        their_g.add_metric([value], i / 3)
    ours = render(
        [
            ours_c,
            ours_g,
            counter("meshlet_once", "one", value=3),
            gauge("meshlet_nan", "nan", value=math.nan),
            counter("meshlet_empty", "no samples", labels=["x"]),
        ]
    )
    assert ours == theirs(
        their_c,
        their_g,
        CounterMetricFamily("meshlet_once", "one", 3),
        GaugeMetricFamily("meshlet_nan", "nan", math.nan),
        CounterMetricFamily("meshlet_empty", "no samples", labels=["x"]),
    )
    parsed = {f.name: f for f in text_string_to_metric_families(ours.decode())}
    assert [s.labels["name"] for s in parsed["meshlet_things"].samples] == AWKWARD
    assert parsed["meshlet_things"].documentation == help_text


def test_histograms_write_cumulative_buckets_count_and_sum() -> None:
    labels = ["direction", "code"]
    buckets = [("0.005", 1.0), ("0.1", 3.0), ("+Inf", 4.0)]
    ours = histogram("meshlet_seconds", "durations", labels=labels)
    ours.add_histogram(["out", "2xx"], buckets, 0.25)
    ours.add_histogram(['we"ird', "5xx"], [("0.005", 0.0), ("0.1", 0.0), ("+Inf", 2.0)], 61.5)
    their = HistogramMetricFamily("meshlet_seconds", "durations", labels=labels)
    their.add_metric(["out", "2xx"], buckets, 0.25)
    their.add_metric(['we"ird', "5xx"], [("0.005", 0.0), ("0.1", 0.0), ("+Inf", 2.0)], 61.5)
    assert render([ours]) == theirs(their)
    assert (
        'meshlet_seconds_bucket{code="2xx",direction="out",le="+Inf"} 4.0\n'
        in render([ours]).decode()
    )


def test_rows_are_produced_as_the_pieces_are_taken() -> None:
    """A family's ``rows`` (the per-endpoint series) are read only as the exposition is
    written, in pieces that each end at a line's end; the text is prometheus-client's."""
    rows = [([f"svc-{i % 7}", f"10.0.{i >> 8}.{i & 255}:8080"], float(i)) for i in range(5000)]
    produced = 0

    def produce() -> Iterator[tuple[list[str], float]]:
        nonlocal produced
        for row in rows:
            produced += 1
            yield row

    labels = ["service", "endpoint"]
    pieces = chunks([counter("meshlet_tries", "per endpoint", labels=labels, rows=produce())])
    first = next(pieces)
    assert 0 < produced < len(rows)
    rest = list(pieces)
    assert produced == len(rows)
    assert all(p.endswith(b"\n") and len(p) < CHUNK + 200 for p in [first, *rest])
    their = CounterMetricFamily("meshlet_tries", "per endpoint", labels=labels)
    for values, value in rows:
        their.add_metric(values, value)
    assert b"".join([first, *rest]) == theirs(their)


@pytest.mark.parametrize(
    ("value", "written"),
    [
        (0, "0.0"),
        (1, "1.0"),
        (0.1, "0.1"),
        (-2.5, "-2.5"),
        (123456.0, "123456.0"),
        (1234567.0, "1.234567e+06"),
        (51535872.0, "5.1535872e+07"),
        (1e16, "1e+16"),
        (1e-7, "1e-07"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_values_are_written_as_prometheus_writes_floats(value: float, written: str) -> None:
    assert go_float(value) == written


def test_process_metrics_are_the_process_s_own() -> None:
    found = {f.name: f for f in ProcessMetrics().families()}
    assert list(found) == [
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_cpu_seconds",
        "process_open_fds",
        "process_max_fds",
    ]
    value = {name: family.samples[0][2] for name, family in found.items()}
    assert value["process_resident_memory_bytes"] > 1 << 20
    assert value["process_virtual_memory_bytes"] >= value["process_resident_memory_bytes"]
    assert time.time() - 24 * 3600 < value["process_start_time_seconds"] <= time.time()
    assert 0 < value["process_cpu_seconds"] <= time.process_time() + 0.1
    assert value["process_open_fds"] == len(os.listdir("/proc/self/fd"))
    assert value["process_max_fds"] == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    assert "process_cpu_seconds_total " in render(found.values()).decode()


def test_without_proc_there_are_no_process_metrics(tmp_path: os.PathLike[str]) -> None:
    assert ProcessMetrics(str(tmp_path)).families() == []
