"""The sidecar proxy against nginx and HAProxy, measured in the same run.

nginx serves a 1 KiB body as the backend. wrk (the load generator) and the backend are pinned
to CPU 0; every proxy is pinned to CPU 1 (a single worker or thread each). Rounds interleave
the targets:
  direct       wrk -> nginx backend
  nginx        wrk -> nginx proxy (upstream keepalive) -> backend
  haproxy      wrk -> HAProxy (http mode, keep-alive) -> backend
  meshlet      wrk -> meshlet outbound -> backend
  meshlet-nomet  the same with --metrics off (the cost of metrics: on/off CPU per request)
  meshlet-2hop wrk -> meshlet outbound -> meshlet inbound -> backend
Printed per round and as medians: throughput relative to nginx proxy, CPU-seconds per 1,000
requests of each proxy (utime + stime from /proc), and latency added over direct (p50, p99)
at 1 and at 50 connections.
Goals: CPU per request <= 1.6x HAProxy (issue 12; was 2x); added p50 at one connection
<= 0.3 ms per hop; throughput >= 0.5x nginx.

Run: .venv/bin/python tests/benchmarks/bench_proxy.py [--rounds 3] [--seconds 5]
Needs nginx, haproxy and wrk (apt-get install nginx haproxy wrk).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LOAD_CORE = "0"
PROXY_CORE = "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


@dataclass
class Result:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    cpu_per_1000: float | None


UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def parse_wrk(out: str) -> tuple[float, int, float, float]:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    pct = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)", out, re.M))

    def ms(v: str) -> float:
        num, unit = re.match(r"([\d.]+)(\w+)", v).groups()  # type: ignore[union-attr]
        return float(num) * UNITS[unit]

    if re.search(r"Non-2xx or 3xx responses", out) or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    return rps, requests, ms(pct["50"]), ms(pct["99"])


def run_wrk(port: int, host: str, conns: int, seconds: float, cpu_pids: list[int]) -> Result:
    before = cpu_seconds(cpu_pids) if cpu_pids else 0.0
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            "wrk",
            "-t1",
            f"-c{conns}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-H",
            f"Host: {host}",
            f"http://127.0.0.1:{port}/",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    used = cpu_seconds(cpu_pids) - before if cpu_pids else None
    rps, requests, p50, p99 = parse_wrk(out)
    per_1000 = used / requests * 1000 if used is not None and requests else None
    return Result(rps, requests, p50, p99, per_1000)


PROXY_PASS = (
    "location / { proxy_pass http://backend; proxy_http_version 1.1; "
    'proxy_set_header Connection ""; }'
)
"""nginx as a proxy to the backend, keeping upstream connections open"""


class Lab:
    """The backend, the proxies, and what to measure of each."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen[bytes]] = []
        self.targets: dict[str, tuple[int, str, Callable[[], list[int]]]] = {}
        self.backend_port = 0

    def spawn(
        self, core: str, *argv: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["taskset", "-c", core, *argv],
            stdout=subprocess.DEVNULL,
            stderr=open(self.tmp / f"{Path(argv[0]).name}-{len(self.procs)}.log", "wb"),  # noqa: SIM115
            env=None if env is None else {**os.environ, **env},
        )
        self.procs.append(proc)
        return proc

    def nginx_conf(self, name: str, port: int, server: str, extra: str = "") -> Path:
        """One worker serving ``server`` on ``port``; ``http://backend`` is the backend."""
        conf = self.tmp / f"{name}.conf"
        upstream = (
            f"upstream backend {{ server 127.0.0.1:{self.backend_port}; keepalive 128; }}"
            if self.backend_port
            else ""
        )
        conf.write_text(
            f"""
worker_processes 1;
daemon off;
{extra}
pid {self.tmp}/{name}.pid;
error_log {self.tmp}/{name}.error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  {upstream}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    {server}
  }}
}}
"""
        )
        return conf

    def nginx(self, name: str, core: str, server: str) -> int:
        port = free_port()
        conf = self.nginx_conf(name, port, server)
        self.spawn(core, "nginx", "-c", str(conf), "-e", f"{self.tmp}/{name}.error.log")
        wait_port(port)
        return port

    def backend(self) -> None:
        """An nginx serving a 1 KiB body, on the load generator's core."""
        (self.tmp / "body").write_bytes(b"b" * 1024)
        self.backend_port = 0  # the backend itself has no upstream
        self.backend_port = self.nginx(
            "backend", LOAD_CORE, f"location / {{ root {self.tmp}; try_files /body =404; }}"
        )

    def haproxy_cfg(self, name: str, port: int, upstream: int) -> Path:
        cfg = self.tmp / f"{name}.cfg"
        cfg.write_text(
            f"""
global
  nbthread 1
  maxconn 4000
defaults
  mode http
  timeout connect 1s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
listen proxy
  bind 127.0.0.1:{port}
  server backend 127.0.0.1:{upstream}
"""
        )
        return cfg

    def table(self, name: str, port: int) -> Path:
        """A routing table sending service "backend" to ``port``."""
        path = self.tmp / f"{name}.yaml"
        path.write_text(
            f"services:\n  backend:\n    policy: {{lb: round_robin}}\n"
            f"    endpoints: [{{address: 127.0.0.1, port: {port}}}]\n"
        )
        return path

    def sidecar_argv(
        self, name: str, table: Path, outbound: int, inbound: int, *extra: str
    ) -> list[str]:
        return [
            sys.executable,
            "-m",
            "sidecar",
            "--service",
            name,
            "--table",
            str(table),
            "--outbound",
            f"127.0.0.1:{outbound}",
            "--inbound",
            f"127.0.0.1:{inbound}",
            "--admin",
            f"127.0.0.1:{free_port()}",
            "--metrics-listen",
            "127.0.0.1:0",
            "--app",
            f"http://127.0.0.1:{self.backend_port}",
            "--state-dir",
            str(self.tmp / f"{name}.state"),
            "--log-level",
            "warning",
            *extra,
        ]

    def start(self) -> None:
        self.backend()
        self.targets["direct"] = (self.backend_port, "backend", list)

        nginx_port = self.nginx("proxy", PROXY_CORE, PROXY_PASS)
        nginx_master = self.procs[-1].pid
        self.targets["nginx"] = (nginx_port, "backend", lambda: self._nginx_workers(nginx_master))

        hap_port = free_port()
        cfg = self.haproxy_cfg("haproxy", hap_port, self.backend_port)
        hap = self.spawn(PROXY_CORE, "haproxy", "-f", str(cfg))
        wait_port(hap_port)
        self.targets["haproxy"] = (hap_port, "backend", lambda: self._tree(hap.pid))

        table = self.table("table", self.backend_port)
        out_port, in_port = free_port(), free_port()
        hop_port = free_port()
        a = self.sidecar("a", table, out_port)
        self.targets["meshlet"] = (out_port, "backend", lambda: self._tree(a.pid))
        off_port = free_port()
        off = self.sidecar("off", table, off_port, "--metrics", "off")
        self.targets["meshlet-nomet"] = (off_port, "backend", lambda: self._tree(off.pid))

        # two hops: A's outbound routes "backend" to B's inbound, which forwards to the backend
        a2 = self.sidecar("a2", self.table("table2", in_port), hop_port)
        b = self.sidecar("b", table, free_port(), inbound=in_port)
        self.targets["meshlet-2hop"] = (
            hop_port,
            "backend",
            lambda: self._tree(a2.pid) + self._tree(b.pid),
        )

    def sidecar(
        self, name: str, table: Path, outbound: int, *extra: str, inbound: int | None = None
    ) -> subprocess.Popen[bytes]:
        argv = self.sidecar_argv(name, table, outbound, inbound or free_port(), *extra)
        proc = self.spawn(PROXY_CORE, *argv)
        wait_port(outbound)
        if inbound:
            wait_port(inbound)
        return proc

    def _tree(self, pid: int) -> list[int]:
        # taskset execs the program, so the pid is the proxy itself (plus any children)
        return [pid, *children(pid)]

    def _nginx_workers(self, master: int) -> list[int]:
        return children(master) or [master]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    for tool in ("nginx", "haproxy", "wrk", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install nginx haproxy wrk)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    tmp.chmod(0o755)  # nginx workers run as nobody and serve the body from here
    lab = Lab(tmp)
    results: dict[tuple[str, int], list[Result]] = defaultdict(list)
    try:
        lab.start()
        for name, (port, host, _) in lab.targets.items():  # warm up, and check it answers
            req = urllib.request.Request(f"http://127.0.0.1:{port}/", headers={"Host": host})
            with urllib.request.urlopen(req, timeout=5) as r:
                assert r.status == 200, name
                assert len(r.read()) == 1024, name
            run_wrk(port, host, 50, 1, [])
        for rnd in range(args.rounds):
            for conns in (1, 50):
                for name, (port, host, pids) in lab.targets.items():
                    res = run_wrk(port, host, conns, args.seconds, pids())
                    results[(name, conns)].append(res)
                    cpu = f"{res.cpu_per_1000:.3f}" if res.cpu_per_1000 is not None else "  -  "
                    print(
                        f"round {rnd + 1} c={conns:<2} {name:<13} {res.rps:9.0f} req/s  "
                        f"p50 {res.p50_ms:6.3f} ms  p99 {res.p99_ms:6.3f} ms  cpu/1k {cpu} s",
                        flush=True,
                    )
        report(results, args.rounds)
    finally:
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def report(results: dict[tuple[str, int], list[Result]], rounds: int) -> None:
    def med(values: list[float]) -> float:
        return statistics.median(values)

    names = ["direct", "nginx", "haproxy", "meshlet", "meshlet-nomet", "meshlet-2hop"]
    print(f"\nmedians over {rounds} rounds (ratios taken per round)")
    print(
        f"{'':13} {'rps/nginx':>10} {'cpu/1k req':>11} {'cpu/haproxy':>12} "
        f"{'+p50 c1':>9} {'+p99 c1':>9} {'+p50 c50':>9} {'+p99 c50':>9}"
    )
    for name in names:
        c50, c1 = results[(name, 50)], results[(name, 1)]
        nginx50, hap50 = results[("nginx", 50)], results[("haproxy", 50)]
        d1, d50 = results[("direct", 1)], results[("direct", 50)]
        rps_ratio = med([r.rps / n.rps for r, n in zip(c50, nginx50, strict=True)])
        cpu = [r.cpu_per_1000 for r in c50 if r.cpu_per_1000 is not None]
        cpu_ratio = [
            r.cpu_per_1000 / h.cpu_per_1000
            for r, h in zip(c50, hap50, strict=True)
            if r.cpu_per_1000 and h.cpu_per_1000
        ]
        added = [
            med([r.p50_ms - d.p50_ms for r, d in zip(c1, d1, strict=True)]),
            med([r.p99_ms - d.p99_ms for r, d in zip(c1, d1, strict=True)]),
            med([r.p50_ms - d.p50_ms for r, d in zip(c50, d50, strict=True)]),
            med([r.p99_ms - d.p99_ms for r, d in zip(c50, d50, strict=True)]),
        ]
        print(
            f"{name:13} {rps_ratio:10.2f} "
            f"{(f'{med(cpu):.3f} s') if cpu else '-':>11} "
            f"{(f'{med(cpu_ratio):.2f}x') if cpu_ratio else '-':>12} "
            + " ".join(f"{a:8.3f}ms" if name != "direct" else f"{'':>10}" for a in added)
        )
    on, off = results[("meshlet", 50)], results[("meshlet-nomet", 50)]
    metrics_cost = [
        r.cpu_per_1000 / o.cpu_per_1000
        for r, o in zip(on, off, strict=True)
        if r.cpu_per_1000 and o.cpu_per_1000
    ]
    if metrics_cost:
        print(f"cpu per request, metrics on / off: {med(metrics_cost):.3f}x")
    print(
        "goals: cpu/haproxy <= 1.6x; +p50 at c=1 <= 0.3 ms per hop; rps/nginx >= 0.5; "
        "metrics on/off <= 1.10x"
    )


if __name__ == "__main__":
    sys.exit(main())
