"""System calls and CPU split per request under load: meshlet against HAProxy, same run.

bench_proxy's backend (nginx, 1 KiB body) and its one-hop targets: HAProxy (one thread,
keep-alive) and a meshlet outbound (the installed build; ``MESHLET_PURE=1`` for the pure one),
each pinned to the proxy core. Per round and target: ``wrk -c50`` (keep-alive) while
``perf stat -e 'syscalls:sys_enter_*'`` counts the proxy's system calls by name (a tracepoint
count: the proxy runs at full speed, unlike under strace), and /proc gives its user and system
CPU. Printed: system calls per request by name (medians over the rounds; names under 0.01 per
request left out), their total, and user, system and total CPU-microseconds per request, with
the ratio meshlet / HAProxy (median of per-round ratios).

Run: .venv/bin/python tests/benchmarks/bench_syscalls.py [--rounds 3] [--seconds 5] [--conns 50]
Needs nginx, haproxy, wrk and perf with tracepoints readable (root, or
kernel.perf_event_paranoid <= 1).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: ``tests`` from the repo root

from tests.benchmarks import bench_proxy  # noqa: E402
from tests.benchmarks.bench_proxy import LOAD_CORE, PROXY_CORE, free_port, wait_port  # noqa: E402

COUNT = re.compile(r"^\s*([\d,]+|<not counted>)\s+syscalls:sys_enter_(\w+)", re.M)


@dataclass
class Sample:
    requests: int
    calls: dict[str, float]
    """system calls per request, by name"""
    user_us: float
    sys_us: float


def cpu_ticks(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def wrk(port: int, conns: int, seconds: int) -> int:
    out = subprocess.run(
        [
            *("taskset", "-c", LOAD_CORE, "wrk", "-t1", f"-c{conns}", f"-d{seconds}s"),
            *("-H", "Host: backend", f"http://127.0.0.1:{port}/"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    found = re.search(r"(\d+) requests in", out)
    assert found is not None, out
    return int(found.group(1))


def measure(pid: int, port: int, conns: int, seconds: int) -> Sample:
    perf = subprocess.Popen(
        ["perf", "stat", "-e", "syscalls:sys_enter_*", "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        before = cpu_ticks(pid)
        requests = wrk(port, conns, seconds)
        after = cpu_ticks(pid)
    finally:
        perf.send_signal(signal.SIGINT)
        _, err = perf.communicate(timeout=60)
    counts = {
        name: int(n.replace(",", "")) / requests
        for n, name in COUNT.findall(err)
        if n != "<not counted>" and n != "0"
    }
    if not counts:
        raise RuntimeError(f"perf counted nothing:\n{err[-2000:]}")
    tick_us = 1e6 / os.sysconf("SC_CLK_TCK")
    return Sample(
        requests,
        counts,
        (after[0] - before[0]) * tick_us / requests,
        (after[1] - before[1]) * tick_us / requests,
    )


def report(samples: dict[str, list[Sample]]) -> None:
    med = statistics.median
    names = list(samples)
    calls = sorted(
        {c for runs in samples.values() for s in runs for c in s.calls},
        key=lambda c: -max(med([s.calls.get(c, 0.0) for s in runs]) for runs in samples.values()),
    )
    print(f"\nsystem calls per request (median of {len(samples[names[0]])} rounds)")
    print(f"{'':22}" + "".join(f"{n:>12}" for n in names))
    for call in calls:
        row = [med([s.calls.get(call, 0.0) for s in samples[n]]) for n in names]
        if max(row) >= 0.01:
            print(f"{call:22}" + "".join(f"{v:12.3f}" for v in row))
    totals = [med([sum(s.calls.values()) for s in samples[n]]) for n in names]
    print(f"{'total':22}" + "".join(f"{v:12.3f}" for v in totals))
    print("\nCPU-microseconds per request: median (min..max)")
    for n in names:
        runs = samples[n]
        split = {
            "user": [s.user_us for s in runs],
            "system": [s.sys_us for s in runs],
            "total": [s.user_us + s.sys_us for s in runs],
        }
        for label, vals in split.items():
            print(f"  {n:12} {label:7} {med(vals):7.2f} ({min(vals):.2f}..{max(vals):.2f})")
    base = names[0]
    for n in names[1:]:
        ratios = [
            (s.user_us + s.sys_us) / (b.user_us + b.sys_us)
            for s, b in zip(samples[n], samples[base], strict=True)
        ]
        print(
            f"{n} / {base} CPU per request: {med(ratios):.2f}x "
            f"({min(ratios):.2f}..{max(ratios):.2f})"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--conns", type=int, default=50)
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds < 1 or args.conns < 1:
        parser.error("--rounds, --seconds and --conns must be >= 1")
    for tool in ("nginx", "haproxy", "wrk", "perf", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-syscalls-"))
    tmp.chmod(0o755)  # nginx workers run as nobody and serve the body from here
    lab = bench_proxy.Lab(tmp)
    samples: dict[str, list[Sample]] = defaultdict(list)
    try:
        lab.backend()
        hap_port = free_port()
        hap = lab.spawn(
            PROXY_CORE, "haproxy", "-f", str(lab.haproxy_cfg("haproxy", hap_port, lab.backend_port))
        )
        wait_port(hap_port)
        mesh_port = free_port()
        mesh = lab.sidecar("meshlet", lab.table("table", lab.backend_port), mesh_port)
        targets = {"haproxy": (hap.pid, hap_port), "meshlet": (mesh.pid, mesh_port)}
        for _, port in targets.values():
            wrk(port, args.conns, 1)  # warm-up
        for rnd in range(1, args.rounds + 1):
            for name, (pid, port) in targets.items():
                s = measure(pid, port, args.conns, args.seconds)
                samples[name].append(s)
                print(
                    f"round {rnd} {name:8} {s.requests:8} requests  "
                    f"{sum(s.calls.values()):6.2f} syscalls/req  "
                    f"user {s.user_us:6.2f} us  sys {s.sys_us:6.2f} us",
                    flush=True,
                )
        report(samples)
    finally:
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
