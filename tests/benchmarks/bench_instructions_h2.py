"""Instructions per HTTP/2 request of each proxy, counted by callgrind in the proxy process only
(issue 16), as bench_instructions counts HTTP/1.1 requests.

Every proxy speaks HTTP/2 both ways to bench_proxy's h2c backend (``h2_lab``: ``GET /`` a
1 KiB body; a unary gRPC call answered with a message and ``grpc-status: 0``), under
``valgrind --tool=callgrind`` on the proxy core:
  nginx        listen http2, grpc_pass (upstream keepalive), master_process off
  haproxy      bind proto h2, server proto h2, one thread
  meshlet-B    the outbound, the service's policy protocol: http2; B the build (as
               bench_instructions: the one installed and, when it is compiled, the pure one)
The client is h2load with one connection and one stream at a time (-c1 -m1). Per target, kind
(``h2c``, ``grpc``) and round: ``--warmup`` requests, ``callgrind_control -z``, ``--requests``
requests on a connection of their own (its setup counted: spread over the requests), a dump,
as long again idle and a second dump. Instructions per request = (measured - idle) / requests.
Printed: min/median/max per target and kind, and the median of the per-round ratios
meshlet / HAProxy and meshlet / nginx. Goal (issue 16): CPU per unary gRPC call <= 2x
HAProxy's.

Run: .venv/bin/python tests/benchmarks/bench_instructions_h2.py [--requests 1000]
     [--warmup 300] [--rounds 3] [--keep]
Needs valgrind, nginx, haproxy and h2load (apt-get install valgrind nginx haproxy
nghttp2-client). Takes about 5 minutes on two cores with two builds. ``--keep`` keeps the
dumps (``callgrind_annotate <dump>``).
"""

from __future__ import annotations

import argparse
import os
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

from tests.benchmarks import bench_instructions as counting  # noqa: E402
from tests.benchmarks import h2_lab  # noqa: E402
from tests.benchmarks.bench_proxy import LOAD_CORE, free_port, wait_port  # noqa: E402


@dataclass
class Target:
    name: str
    port: int
    proxy: counting.Counted


class Lab(counting.Lab):
    """The h2c backend, and each HTTP/2 proxy under callgrind."""

    def start_counted_h2(self, builds: dict[str, dict[str, str]]) -> list[Target]:
        h2_lab.write_files(self.tmp)
        server = h2_lab.backend_server(self.tmp)
        backend = self.nginx("h2-backend", LOAD_CORE, server, listen="http2", backend=0)
        nginx, hap = free_port(), free_port()
        conf = self.nginx_conf(
            "nginx", nginx, h2_lab.GRPC_PASS, "master_process off;", "http2", backend
        )
        error_log = f"{self.tmp}/nginx.error.log"
        cfg = self.haproxy_cfg("haproxy", hap, backend, "proto h2", "proto h2")
        targets = [
            Target(
                "nginx", nginx, self.counted("nginx", "nginx", "-c", str(conf), "-e", error_log)
            ),
            Target("haproxy", hap, self.counted("haproxy", "haproxy", "-f", str(cfg))),
        ]
        table = self.table("h2", backend, "http2")
        for build, env in builds.items():
            port = free_port()
            name = f"meshlet-{build}"
            targets.append(Target(name, port, self.meshlet(name, table, port, free_port(), env)))
        for target in targets:
            wait_port(target.port, counting.START_TIMEOUT)
        return targets


def h2load(port: int, kind: str, tmp: Path, requests: int) -> None:
    argv = h2_lab.h2load_argv(port, kind, tmp, "-c1", "-m1", f"-n{requests}")
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600).stdout
    h2_lab.parse_h2load(out)  # (RuntimeError on any failure)


def measure(target: Target, kind: str, tmp: Path, warmup: int, requests: int) -> float:
    """Instructions per request, idle subtracted."""
    if warmup:
        h2load(target.port, kind, tmp, warmup)
    target.proxy.control("-z")
    started = time.monotonic()
    h2load(target.port, kind, tmp, requests)
    seconds = time.monotonic() - started
    busy = target.proxy.dump()
    time.sleep(seconds)
    idle = target.proxy.dump()
    return (busy - idle) / requests


Results = dict[tuple[str, str], list[float]]


def report(results: Results, targets: list[Target]) -> None:
    rounds = len(results[(targets[0].name, "grpc")])
    print(f"\ninstructions per HTTP/2 request, {rounds} rounds (idle subtracted)")
    print(f"{'':22} {'min':>10} {'median':>10} {'max':>10} {'spread':>9}")
    for kind in h2_lab.KINDS:
        for target in targets:
            print(f"{kind:<4} {target.name:17} {counting.spread(results[(target.name, kind)])}")

    def ratio(a: str, b: str, kind: str) -> str:
        values = [x / y for x, y in zip(results[(a, kind)], results[(b, kind)], strict=True)]
        return f"{statistics.median(values):6.2f}x ({min(values):.2f}..{max(values):.2f})"

    print("\nratios: median (min..max) of the per-round ratios")
    for target in targets[2:]:
        for kind in h2_lab.KINDS:
            for base in ("haproxy", "nginx"):
                print(f"  {kind:<4} {target.name} / {base:<7} {ratio(target.name, base, kind)}")
    print(f"goal: {h2_lab.GOAL}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=1000, help="measured requests a round")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps")
    args = parser.parse_args()
    if args.requests < 1 or args.warmup < 0 or args.rounds < 1:
        parser.error("--requests and --rounds must be >= 1, --warmup >= 0")
    for tool in ("valgrind", "callgrind_control", "nginx", "haproxy", "h2load", "taskset"):
        if shutil.which(tool) is None:
            print(
                f"{tool} not found (apt-get install valgrind nginx haproxy nghttp2-client)",
                file=sys.stderr,
            )
            return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # through the finally below: no valgrind left behind

    signal.signal(signal.SIGTERM, stop)
    os.sched_setaffinity(0, {int(LOAD_CORE)})  # the client beside the backend
    variants = counting.builds()
    print(f"meshlet builds: {', '.join(variants)}", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="bench-instructions-h2-"))
    tmp.chmod(0o755)  # the backend's workers run as nobody and serve from here
    lab = Lab(tmp)
    results: Results = {}
    started = time.monotonic()
    try:
        lab.backend()
        targets = lab.start_counted_h2(variants)
        print(f"all listening after {time.monotonic() - started:.0f} s", flush=True)
        for rnd in range(1, args.rounds + 1):
            for kind in h2_lab.KINDS:
                for target in targets:
                    per_request = measure(target, kind, tmp, args.warmup, args.requests)
                    results.setdefault((target.name, kind), []).append(per_request)
                    print(
                        f"round {rnd} {kind:<4} {target.name:17} "
                        f"{per_request:10,.0f} instructions/request",
                        flush=True,
                    )
        report(results, targets)
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
