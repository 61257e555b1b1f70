"""Instructions per request of each proxy, counted by callgrind in the proxy process only.

Every proxy runs under ``valgrind --tool=callgrind`` on the proxy core, beside bench_proxy's
nginx backend (1 KiB body, not under valgrind). This process is the client: one keep-alive
connection per target and round, one request at a time, each answer read in full, so every
target sees the same requests:
  nginx          client -> nginx proxy (one process, upstream keepalive) -> backend
  haproxy        client -> HAProxy (http mode, keep-alive, one thread) -> backend
  haproxy-2hop   client -> HAProxy -> HAProxy -> backend (both counted)
  meshlet-B      client -> meshlet outbound -> backend
  meshlet-B-2hop client -> meshlet outbound -> meshlet inbound -> backend (both counted)
B is the sidecar build: the one installed (``sidecar.__compiled__`` true: compiled, false or
absent: pure) and, when that is compiled, the pure one too (``MESHLET_PURE=1``).
A round, per target: ``--warmup`` requests, ``callgrind_control -z`` (zero), ``--requests``
requests, a dump (the measured part), then as long again idle with the connection open and a
second dump (timers, the loop waking). Instructions per request = (measured - idle) / requests.
Callgrind counts what the process executes in user space, so the figure repeats to about 0.1 %
whatever else the machine runs, unlike CPU time.

Printed: min/median/max over the rounds per target and per hop, and the median of the
per-round ratios meshlet / HAProxy (1 hop, 2 hops) and meshlet / nginx. Goals (issue 12), per
hop: compiled <= 2.5x HAProxy (moonshot 1.5x), pure Python <= 4.5x.

The sidecar keeps its default allocator (pymalloc), as in production (``PYTHONMALLOC=malloc``
measured 8 % more and repeated ten times worse), and runs ``--app-health none``: the peers
check nothing either, and a 5 s timer that falls in the measured window or not is noise. nginx
runs ``master_process off`` so that the process under valgrind is the one that serves.

Run: .venv/bin/python tests/benchmarks/bench_instructions.py [--requests 2000] [--warmup 500]
     [--rounds 3] [--keep] [--build compiled|pure]
Needs valgrind, nginx and haproxy (apt-get install valgrind nginx haproxy). Takes about
4.5 minutes on two cores with one build (valgrind runs a proxy ~50x slower, a sidecar needs
a minute to start). ``--keep`` keeps the dumps: ``callgrind_annotate <dump>`` shows where the
instructions go.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: ``tests`` from the repo root

from tests.benchmarks import bench_proxy  # noqa: E402
from tests.benchmarks.bench_proxy import LOAD_CORE, PROXY_CORE, PROXY_PASS, free_port, wait_port  # noqa: E402

START_TIMEOUT = 300.0
"""seconds the proxies under valgrind may take to listen (all start at once on one core)"""
GOALS = {"compiled": "<= 2.5x (moonshot 1.5x)", "pure": "<= 4.5x"}
"""meshlet / HAProxy instructions per hop (issue 12)"""
PURE = {"MESHLET_PURE": "1"}
SUMMARY = re.compile(rb"^summary:\s*(\d+)", re.M)
"""a dump's events since the last zero or dump (its ``totals:`` add up to 2 % of calls in flight)"""


@dataclass
class Counted:
    """One process under callgrind."""

    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    dumps: int = 0

    def control(self, flag: str) -> None:
        res = subprocess.run(
            ["callgrind_control", flag, str(self.proc.pid)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if res.returncode != 0 or "OK" not in res.stdout:
            raise RuntimeError(f"callgrind_control {flag} {self.name}: {res.stdout}{res.stderr}")

    def dump(self) -> int:
        """Instructions since the last zero or dump (a dump zeroes the counters)."""
        self.control("-d")
        self.dumps += 1
        part = Path(f"{self.out}.{self.dumps}")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            data = part.read_bytes() if part.exists() else b""
            if b"\ntotals:" in data and (summary := SUMMARY.search(data)):  # written in full
                return int(summary.group(1))
            time.sleep(0.1)
        raise RuntimeError(f"callgrind wrote no {part}")


@dataclass
class Target:
    name: str
    port: int
    hops: list[Counted]


class Lab(bench_proxy.Lab):
    """bench_proxy's backend and configurations, each proxy under callgrind."""

    def counted(self, name: str, *argv: str, env: dict[str, str] | None = None) -> Counted:
        out = self.tmp / f"{name}.callgrind"
        valgrind = ("valgrind", "--tool=callgrind", f"--callgrind-out-file={out}")
        return Counted(name, self.spawn(PROXY_CORE, *valgrind, *argv, env=env), out)

    def haproxy(self, name: str, port: int, upstream: int) -> Counted:
        return self.counted(name, "haproxy", "-f", str(self.haproxy_cfg(name, port, upstream)))

    def meshlet(
        self, name: str, table: Path, outbound: int, inbound: int, env: dict[str, str]
    ) -> Counted:
        argv = self.sidecar_argv(name, table, outbound, inbound, "--app-health", "none")
        return self.counted(name, *argv, env=env)

    def start_counted(self, builds: dict[str, dict[str, str]]) -> list[Target]:
        """Every proxy, started together and waited for together."""
        nginx, hap, hap_out, hap_in = (free_port() for _ in range(4))
        conf = self.nginx_conf("nginx", nginx, PROXY_PASS, extra="master_process off;")
        error_log = f"{self.tmp}/nginx.error.log"
        targets = [
            Target(
                "nginx", nginx, [self.counted("nginx", "nginx", "-c", str(conf), "-e", error_log)]
            ),
            Target("haproxy", hap, [self.haproxy("haproxy", hap, self.backend_port)]),
            Target(
                "haproxy-2hop",
                hap_out,
                [
                    self.haproxy("haproxy-2hop-out", hap_out, hap_in),
                    self.haproxy("haproxy-2hop-in", hap_in, self.backend_port),
                ],
            ),
        ]
        listening = [hap_in]
        direct = self.table("direct", self.backend_port)
        for build, env in builds.items():
            name = f"meshlet-{build}"
            one, out, inbound = free_port(), free_port(), free_port()
            via = self.table(f"{name}-2hop", inbound)
            targets += [
                Target(name, one, [self.meshlet(name, direct, one, free_port(), env)]),
                Target(
                    f"{name}-2hop",
                    out,
                    [
                        self.meshlet(f"{name}-2hop-out", via, out, free_port(), env),
                        self.meshlet(f"{name}-2hop-in", direct, free_port(), inbound, env),
                    ],
                ),
            ]
            listening.append(inbound)
        for port in [*listening, *(t.port for t in targets)]:
            wait_port(port, START_TIMEOUT)
        return targets


def get(conn: http.client.HTTPConnection, n: int) -> None:
    for _ in range(n):
        conn.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", "backend")  # the only header
        conn.endheaders()
        with conn.getresponse() as answer:
            body = answer.read()
        if answer.status != 200 or len(body) != 1024:
            raise RuntimeError(f"answer {answer.status} with {len(body)} bytes")


def measure(target: Target, warmup: int, requests: int) -> tuple[list[float], float]:
    """Instructions per request of each hop, and of the idle part subtracted from them."""
    conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
    try:
        get(conn, warmup)
        for hop in target.hops:
            hop.control("-z")
        started = time.monotonic()
        get(conn, requests)
        seconds = time.monotonic() - started
        busy = [hop.dump() for hop in target.hops]
        time.sleep(seconds)
        idle = [hop.dump() for hop in target.hops]
    finally:
        conn.close()
    per_hop = [(b - i) / requests for b, i in zip(busy, idle, strict=True)]
    return per_hop, sum(idle) / requests


def build_of(env: dict[str, str]) -> str:
    """The sidecar build a process with ``env`` runs: compiled or pure."""
    code = "import sidecar; print('compiled' if getattr(sidecar, '__compiled__', 0) else 'pure')"
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def builds() -> dict[str, dict[str, str]]:
    """The build installed and, when it is the compiled one, the pure one: build -> env."""
    found: dict[str, dict[str, str]] = {build_of({}): {}}
    if "compiled" in found:
        found[build_of(PURE)] = PURE
    return found


def spread(values: list[float]) -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{lo:10,.0f} {mid:10,.0f} {hi:10,.0f} {100 * (hi - lo) / mid:7.3f} %"


def report(results: dict[str, list[list[float]]], targets: list[Target], builds: list[str]) -> None:
    rounds = len(results["nginx"])
    print(f"\ninstructions per request, {rounds} rounds (idle subtracted)")
    print(f"{'':28} {'min':>10} {'median':>10} {'max':>10} {'spread':>9}")
    for target in targets:
        runs = results[target.name]
        print(f"{target.name:28} {spread([sum(r) for r in runs])}")
        for i, hop in enumerate(target.hops if len(target.hops) > 1 else []):
            print(f"  {hop.name:26} {spread([r[i] for r in runs])}")

    def ratio(a: str, b: str) -> float:
        pairs = zip(results[a], results[b], strict=True)
        return statistics.median(sum(x) / sum(y) for x, y in pairs)

    print("\nratios (median of the per-round ratios)")
    for build in builds:
        name = f"meshlet-{build}"
        print(f"{name}: goal per hop {GOALS[build]} HAProxy")
        print(f"  1 hop / haproxy:           {ratio(name, 'haproxy'):6.2f}x")
        print(f"  2 hops / haproxy 2 hops:   {ratio(f'{name}-2hop', 'haproxy-2hop'):6.2f}x")
        print(f"  1 hop / nginx:             {ratio(name, 'nginx'):6.2f}x")
    print(f"haproxy / nginx:             {ratio('haproxy', 'nginx'):6.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests a round")
    parser.add_argument("--warmup", type=int, default=500, help="requests before counting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps")
    parser.add_argument(
        "--build",
        choices=("compiled", "pure"),
        help="count this sidecar build only (default: both)",
    )
    args = parser.parse_args()
    if args.requests < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--requests and --rounds must be >= 1, --warmup >= 0")
    for tool in ("valgrind", "callgrind_control", "nginx", "haproxy", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install valgrind nginx haproxy)", file=sys.stderr)
            return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # through the finally below: no valgrind left behind

    signal.signal(signal.SIGTERM, stop)
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # the client beside the backend
    variants = builds()
    if args.build is not None:
        if args.build not in variants:
            print(f"the {args.build} build is not installed", file=sys.stderr)
            return 2
        variants = {args.build: variants[args.build]}
    print(
        f"meshlet builds: {', '.join(variants)}; {len(variants) * 3 + 4} processes under valgrind"
    )
    tmp = Path(tempfile.mkdtemp(prefix="bench-instructions-"))
    tmp.chmod(0o755)  # the backend's workers run as nobody and serve the body from here
    lab = Lab(tmp)
    results: dict[str, list[list[float]]] = {}
    started = time.monotonic()
    try:
        lab.backend()
        targets = lab.start_counted(variants)
        print(f"all listening after {time.monotonic() - started:.0f} s", flush=True)
        for rnd in range(1, args.rounds + 1):
            for target in targets:
                per_hop, idle = measure(target, args.warmup, args.requests)
                results.setdefault(target.name, []).append(per_hop)
                hops = f" ({' + '.join(f'{h:,.0f}' for h in per_hop)})" if len(per_hop) > 1 else ""
                print(
                    f"round {rnd} {target.name:24} {sum(per_hop):10,.0f} instructions/request"
                    f"{hops}  idle {idle:,.0f}",
                    flush=True,
                )
        report(results, targets, list(variants))
        print(f"took {time.monotonic() - started:.0f} s")
    finally:
        lab.stop()
        if args.keep:
            print(f"callgrind dumps kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
