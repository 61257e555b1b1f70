"""How soon an endpoint that starts failing stops getting requests: the sidecar's passive
outlier ejection against HAProxy, in front of the same backends in the same run.

Each round starts four backends (``tests/backend.py``, b0..b3) and puts a fresh proxy in
front of them for each target, one target after the other (order reversed every other round):
  meshlet-rr       sidecar outbound, lb round_robin, retries 0, default outlier settings
                   (5 failures in a row eject for 30 s)
  meshlet-ewma     the same with lb peak_ewma (the default policy)
  haproxy          HAProxy, http mode, balance roundrobin, retries 0, no redispatch, keep-alive
                   to the servers, ``option httpchk GET /healthz`` and ``check inter 1s fall 3
                   rise 2``: active health checks only
  haproxy-observe  the same plus ``observe layer7 error-limit 5 on-error mark-down``: HAProxy's
                   own passive ejection, the like-for-like peer of the sidecar's outlier
                   detection (health checks alone cannot beat a 1 s interval x 3 falls)
An open-loop client in this process sends GET /whoami at 400 requests/s on a fixed schedule
(request i at start + i/400, whatever has come back) over a pool of keep-alive connections.
After 1 s of warm-up it sends b0 SIGUSR1 (that instant is T0): from when its event loop
handles the signal, b0 answers /whoami and /healthz with 503 "b0 failing". The client goes on
for 4 s more; then b0 is healed (SIGUSR1 again, checked on /healthz) for the next target.
Measured per target:
  failed     requests answered other than 200 in the whole run (by b0 or by the proxy)
  eject ms   send time of the last request b0 answered "b0 failing", minus that of the first:
             how long the proxy kept routing to b0 once it failed (">" marks a target still
             routing to b0 at the end). Not from T0: b0 gets one request every 10 ms, and
             whether the one sent right at T0 reaches b0 before or after its loop handles the
             signal is a race that moved the result by a whole 10 ms cycle either way, for
             every proxy alike (40 or 50 ms, at random, for 5 failures 10 ms apart). One
             failure is 0 ms
  onset ms   send time of the first request b0 answered "b0 failing", minus T0 (that race)
  lag        p99 of how late the client sent requests behind the schedule: small means the
             load was the 400 requests/s asked for
  b0         what the proxy says of b0 afterwards (meshlet: outlier phase, failure penalty and
             the service's ejections, from admin /clusters). Under peak_ewma the balancer may
             stop picking b0 on its failure penalty alone, before outlier ejection has seen
             5 failures in a row: "eject ms" is when b0 stopped getting requests, whichever
             mechanism did it, and this column tells which
Printed per round and as medians; time-to-eject also as a ratio to each HAProxy target
(median of per-round ratios).
Goals: meshlet fails <= 5 requests before ejection; meshlet's time-to-eject below HAProxy's.

Run: .venv/bin/python tests/benchmarks/bench_faults.py [--rounds 5]
Needs haproxy (apt-get install haproxy; it may be in /usr/sbin).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: ``tests`` from the repo root

from tests.benchmarks.bench_proxy import wait_port  # noqa: E402
from tests.processes import Backend, Sidecar, free_port  # noqa: E402

RATE = 400.0
"""requests per second the client sends, whatever comes back"""
WARMUP = 1.0
"""seconds of load before b0 starts failing"""
AFTER = 4.0
"""seconds of load after b0 starts failing (HAProxy's checks need 2-3 s)"""
REQUEST_TIMEOUT = 2.0
"""seconds a request may take before it counts as failed"""
HOST = "b"
TARGETS = ("meshlet-rr", "meshlet-ewma", "haproxy", "haproxy-observe")
MESHLET_LB = {"meshlet-rr": "round_robin", "meshlet-ewma": "peak_ewma"}
PEERS = ("haproxy", "haproxy-observe")
MAX_FAILED = 5


@dataclass(frozen=True, slots=True)
class Sample:
    sent: float  # loop time the request went out
    lag: float  # seconds behind its schedule
    status: int  # 0: no answer
    body: str


@dataclass(frozen=True, slots=True)
class Result:
    failed: int
    eject_ms: float | None  # None: b0 never answered "b0 failing"
    onset_ms: float | None
    still_routed: bool  # b0 got requests until the end: not ejected within the run
    lag_p99_ms: float
    b0: str


def summarize(samples: list[Sample], t0: float, end: float, b0: str) -> Result:
    failed = sum(1 for s in samples if s.status != 200)
    b0_failing = [s.sent for s in samples if s.body == "b0 failing"]
    first, last = min(b0_failing, default=None), max(b0_failing, default=None)
    lags = sorted(s.lag for s in samples)
    return Result(
        failed=failed,
        eject_ms=(last - first) * 1000 if last is not None and first is not None else None,
        onset_ms=(first - t0) * 1000 if first is not None else None,
        still_routed=last is not None and end - last < 0.1,
        lag_p99_ms=lags[int(len(lags) * 0.99)] * 1000 if lags else 0.0,
        b0=b0,
    )


async def one(http: aiohttp.ClientSession, url: str, due: float, samples: list[Sample]) -> None:
    sent = asyncio.get_running_loop().time()
    try:
        async with http.get(url, headers={"Host": HOST}) as r:
            status, body = r.status, (await r.text()).strip()
    except (aiohttp.ClientError, TimeoutError) as e:
        status, body = 0, type(e).__name__
    samples.append(Sample(sent, sent - due, status, body))


async def drive(port: int, fault: Callable[[], None]) -> tuple[list[Sample], float, float]:
    """Open-loop load on ``port``; ``fault()`` after the warm-up. Returns the samples, T0 and
    when the last request was sent (loop times)."""
    samples: list[Sample] = []
    url = f"http://127.0.0.1:{port}/whoami"
    connector = aiohttp.TCPConnector(limit=200)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    loop = asyncio.get_running_loop()
    total, at_fault = round((WARMUP + AFTER) * RATE), round(WARMUP * RATE)
    t0 = end = 0.0
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as http:
        start = loop.time() + 0.01
        async with asyncio.TaskGroup() as tasks:
            for i in range(total):
                due = start + i / RATE
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if i == at_fault:
                    fault()
                    t0 = loop.time()
                tasks.create_task(one(http, url, due, samples))
            end = loop.time()
    return samples, t0, end


class Round:
    """Four backends, and a fresh proxy in front of them per target."""

    def __init__(self, tmp: Path, haproxy: str) -> None:
        self.tmp = tmp
        self.haproxy_bin = haproxy
        self.backends: list[Backend] = []

    def start(self) -> None:
        for i in range(4):
            self.backends.append(Backend(self.tmp / "logs", f"b{i}"))

    def stop(self) -> None:
        for b in self.backends:
            try:
                b.stop(timeout=5)
            except subprocess.TimeoutExpired:
                b.kill()

    def heal(self) -> None:
        """b0 answers 200 again (it was toggled to failing by the last target)."""
        b0 = self.backends[0]
        url = f"http://127.0.0.1:{b0.port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                healthy = r.status == 200
        except urllib.error.HTTPError:
            healthy = False
        if not healthy:
            b0.proc.send_signal(signal.SIGUSR1)
            wait_healthy(url)

    def run(self, target: str) -> Result:
        self.heal()
        proc = self.backends[0].proc

        def fault() -> None:
            proc.send_signal(signal.SIGUSR1)

        if target in MESHLET_LB:
            return self._meshlet(MESHLET_LB[target], fault)
        return self._haproxy(target == "haproxy-observe", fault)

    def _meshlet(self, lb: str, fault: Callable[[], None]) -> Result:
        table = self.tmp / f"table-{lb}.yaml"
        endpoints = ", ".join(f"{{address: 127.0.0.1, port: {b.port}}}" for b in self.backends)
        table.write_text(
            f"services:\n  {HOST}:\n"
            f"    policy: {{lb: {lb}, retries: 0, timeout_ms: {int(REQUEST_TIMEOUT * 1000)}}}\n"
            f"    endpoints: [{endpoints}]\n"
        )
        sidecar = Sidecar(
            self.tmp / "logs",
            "--service",
            "bench",
            "--table",
            str(table),
            "--app-health",
            "none",
            "--state-dir",
            str(self.tmp / "state"),
            "--deregister-delay",
            "0",
            "--drain-timeout",
            "1",
        )
        try:
            samples, t0, end = uvloop.run(drive(sidecar.ports["outbound"], fault))
            status, clusters = sidecar.admin("/clusters")
            assert status == 200, clusters
            service = clusters["services"][HOST]
            row = next(e for e in service["endpoints"] if e["port"] == self.backends[0].port)
            b0 = (
                f"{row.get('outlier', 'healthy')}, penalty {row.get('penalty_ms', 0):.0f} ms, "
                f"ejections {service['counters'].get('ejections', '?')}"
            )
        finally:
            try:
                sidecar.stop(timeout=10)
            except subprocess.TimeoutExpired:
                sidecar.kill()
        return summarize(samples, t0, end, b0)

    def _haproxy(self, observe: bool, fault: Callable[[], None]) -> Result:
        port = free_port()
        passive = " observe layer7 error-limit 5 on-error mark-down" if observe else ""
        servers = "\n".join(
            f"  server b{i} 127.0.0.1:{b.port}" for i, b in enumerate(self.backends)
        )
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(
            f"""
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server {int(REQUEST_TIMEOUT)}s
  option http-keep-alive
  http-reuse always
  retries 0
  no option redispatch
listen proxy
  bind 127.0.0.1:{port}
  balance roundrobin
  option httpchk GET /healthz
  default-server check inter 1s fall 3 rise 2{passive}
{servers}
"""
        )
        log = (self.tmp / "logs" / f"haproxy-{port}.log").open("wb")
        proc = subprocess.Popen(
            [self.haproxy_bin, "-f", str(cfg)], stdout=log, stderr=subprocess.STDOUT
        )
        try:
            wait_port(port)
            samples, t0, end = uvloop.run(drive(port, fault))
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            log.close()
        return summarize(samples, t0, end, "-")


def wait_healthy(url: str, timeout: float = 5.0) -> None:
    for _ in range(int(timeout / 0.05)):
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{url} stays unhealthy")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    haproxy = shutil.which(
        "haproxy", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/usr/local/sbin"
    )
    if haproxy is None:
        print("haproxy not found (apt-get install haproxy)", file=sys.stderr)
        return 2
    # the backends and sidecars run as ``python -m``: they need the repo root on their path
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    results: dict[str, list[Result]] = defaultdict(list)
    print(
        f"{RATE:.0f} requests/s; b0 fails {WARMUP:.0f} s in; {AFTER:.0f} s measured after",
        flush=True,
    )
    try:
        for rnd in range(args.rounds):
            lab = Round(tmp, haproxy)
            try:
                lab.start()
                for name in TARGETS if rnd % 2 == 0 else TARGETS[::-1]:
                    res = lab.run(name)
                    results[name].append(res)
                    print(f"round {rnd + 1} {name:<16} {line(res)}", flush=True)
            finally:
                lab.stop()
        report(results, args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def eject_text(res: Result) -> str:
    if res.eject_ms is None:
        return "-"
    return f"{'>' if res.still_routed else ''}{res.eject_ms:.0f}"


def line(res: Result) -> str:
    onset = f"{res.onset_ms:3.0f}" if res.onset_ms is not None else "  -"
    return (
        f"failed {res.failed:4}  eject {eject_text(res):>6} ms  onset {onset} ms  "
        f"lag p99 {res.lag_p99_ms:5.1f} ms  b0: {res.b0}"
    )


def report(results: dict[str, list[Result]], rounds: int) -> None:
    print(f"\nmedians over {rounds} rounds (ratios taken per round)")
    print(
        f"{'':16} {'failed':>7} {'max':>5} {'eject ms':>9} "
        + " ".join(f"{'eject/' + p:>22}" for p in PEERS)
    )
    for name in TARGETS:
        runs = results[name]
        failed = [r.failed for r in runs]
        ejects = [r.eject_ms for r in runs if r.eject_ms is not None]
        ratios = []
        for peer in PEERS:
            per_round = [
                r.eject_ms / p.eject_ms
                for r, p in zip(runs, results[peer], strict=True)
                if r.eject_ms is not None and p.eject_ms
            ]
            ratios.append(f"{statistics.median(per_round):.3f}x" if per_round else "-")
        median_eject = f"{statistics.median(ejects):.0f}" if ejects else "-"
        print(
            f"{name:16} {statistics.median(failed):7.0f} {max(failed):5} {median_eject:>9} "
            + " ".join(f"{r:>22}" for r in ratios)
        )
    print(
        f"goals: meshlet fails <= {MAX_FAILED} requests before ejection; meshlet eject/haproxy < 1"
    )


if __name__ == "__main__":
    sys.exit(main())
