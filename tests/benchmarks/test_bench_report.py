"""bench_proxy's TLS report: what TLS adds to a request, in microseconds of CPU, for meshlet's
pair and HAProxy's, round by round (rounds without a CPU figure left out)."""

from __future__ import annotations

from collections import defaultdict

import pytest

from tests.benchmarks.bench_proxy import Result, report_tls, tls_own


def result(cpu_per_1000: float | None) -> Result:
    return Result(rps=5000.0, requests=25_000, p50_ms=0.2, p99_ms=0.4, cpu_per_1000=cpu_per_1000)


def test_tls_own_is_the_cpu_a_request_takes_beyond_the_plaintext_pair() -> None:
    results = {
        ("meshlet-2hop-mtls", 1): [result(0.113), result(0.114), result(0.112)],
        ("meshlet-2hop-cp", 1): [result(0.090), result(None), result(0.092)],
    }
    own = tls_own(results, "meshlet-2hop-mtls", "meshlet-2hop-cp", 1)
    assert own == pytest.approx([23.0, 20.0])


def test_the_report_prints_both_proxies_tls_cost_and_their_ratio(
    capsys: pytest.CaptureFixture[str],
) -> None:
    results: dict[tuple[str, int], list[Result]] = defaultdict(list)
    for conns, (mtls, plain, hap_tls, hap) in {
        1: (0.110, 0.090, 0.085, 0.075),
        50: (0.044, 0.038, 0.033, 0.027),
    }.items():
        for name, cpu in (
            ("meshlet-2hop-mtls", mtls),
            ("meshlet-2hop-cp", plain),
            ("haproxy-2hop-tls", hap_tls),
            ("haproxy-2hop", hap),
        ):
            results[(name, conns)].append(result(cpu))
    report_tls(results, {})
    out = capsys.readouterr().out
    assert "meshlet  c=1  20.000 us (20.000..20.000)" in out
    assert "haproxy  c=1  10.000 us (10.000..10.000)" in out
    assert "meshlet / haproxy c=1  2.000x" in out
    assert "meshlet  c=50 6.000 us (6.000..6.000)" in out
    assert "meshlet / haproxy c=50 1.000x" in out
    assert "meshlet-2hop-mtls / meshlet-2hop-cp c=1  1.222x" in out
