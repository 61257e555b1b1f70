"""A real sidecar process's memory (RSS), idle and with a table of 1,000 services x 10 endpoints.

Each run starts fresh sidecar processes and reads their VmRSS from /proc once they have their
table and have been quiet for a second:
  python        a bare ``python -c 'import asyncio, uvloop'`` process: the interpreter and the
                event loop, what no Python sidecar can go below (the peer of this run)
  deps          the same importing what else a running sidecar imports of others' code
                (httptools, xxhash, ssl; no aiohttp, no prometheus_client since issue 12): its
                floor as it is built
  push idle     a sidecar on a control plane whose table holds only its own instance
  push 1000x10  a sidecar on a control plane holding 1,000 services x 10 instances (the table
                pushed to it, applied, saved to its state dir; its /config_dump says when: on a
                busy machine its ACK may be lost with a stream the control plane cut while the
                table was parsed, and the next stream has nothing to ACK)
  push 1000x10 scraped
                the same, after Prometheus scraped its metrics port 3 times (``--scrapes``):
                what a sidecar holds in production, scraped every 15 s
  file idle     a sidecar routing by a ``--table`` file of no services
  file 1000x10  a sidecar routing by a ``--table`` file of the same 1,000 x 10 table
Meshlet's modules are compiled first, as an installed package has them (``bytecode_as_installed``).
Every endpoint has an address of its own, as in a mesh (10,000 connection pools, not the 10 a
table of 1,000 services on the same 10 addresses would make).
Printed: min / median / max of the runs for each, and each median less the peers' (less
``deps``: what the sidecar itself holds). Goals (issue 12): with the 1,000 x 10 table <= 50 MB,
idle <= 35 MB.

Run: .venv/bin/python tests/benchmarks/bench_memory.py [--runs 3] [--services 1000] [--scrapes 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

GOALS = {"idle": 35.0, "loaded": 50.0}
"""MB of RSS (issue 12)"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{what}: not within {timeout:.0f} s")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def clean_env() -> dict[str, str]:
    """This environment without any MESHLET_ setting, so only the benchmark's count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}


def address(service: int, i: int) -> str:
    """Endpoint ``i`` of service ``service``: every endpoint its own host, as in a mesh."""
    n = service * 100 + i
    return f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}"


class ControlPlane:
    """A control plane process (memory store) with an admin token, and REST calls to it."""

    def __init__(self) -> None:
        self.admin = secrets.token_urlsafe(32)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "control_plane",
                "--listen",
                self.url.removeprefix("http://"),
                "--store",
                "memory",
                "--log-level",
                "warning",
                "--heartbeat-ttl",  # registered over REST, the instances never heartbeat
                "3600",
                "--remove-after",
                "7200",
            ],
            env={**clean_env(), "MESHLET_ADMIN_TOKEN": self.admin},
        )
        wait_until(lambda: bool(self.call("GET", "/readyz")), "the control plane")

    def call(self, method: str, path: str, body: object = None) -> Any:
        req = urllib.request.Request(
            self.url + path,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.admin}"},
            method=method,
        )
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def register(self, services: int, endpoints: int) -> None:
        def one(s: int) -> None:
            for i in range(endpoints):
                body = {"address": address(s, i), "id": f"i{i}", "port": 8080}
                self.call("POST", f"/v1/services/big-{s}/instances", body)

        with ThreadPoolExecutor(8) as pool:
            list(pool.map(one, range(services)))

    def token(self, service: str) -> str:
        secret: str = self.call("POST", "/v1/tokens", {"service": service})["secret"]
        return secret

    def applied(self, service: str, admin: int) -> bool:
        """Whether the sidecar with that admin port has applied the control plane's current
        table, and that table has its own instance (registered, debounced, pushed)."""
        table = self.call("GET", "/v1/table")
        if not table["services"].get(service, {}).get("endpoints"):
            return False
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/config_dump", timeout=10) as r:
            dump = json.loads(r.read())
        return bool(dump["control_plane"]["version"] == table["version"])

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def table_file(path: Path, services: int, endpoints: int) -> Path:
    """The same table the control plane pushes, as a routing file."""
    table = {
        f"big-{s}": {
            "endpoints": [
                {"address": address(s, i), "port": 8080, "instance": f"i{i}"}
                for i in range(endpoints)
            ]
        }
        for s in range(services)
    }
    path.write_text(json.dumps({"services": table}))
    return path


def sidecar(
    tmp: Path,
    *,
    table: Path | None = None,
    cp: ControlPlane | None = None,
    service: str = "rss",
    scrapes: int = 0,
) -> float:
    """A sidecar's RSS in MB once it has its table, its metrics port was read ``scrapes``
    times, and it has been quiet for a second."""
    admin, metrics = free_port(), free_port()
    args = [
        sys.executable,
        "-m",
        "sidecar",
        "--service",
        service,
        "--advertise",
        "127.0.0.1",
        "--outbound",
        "127.0.0.1:0",
        "--inbound",
        "127.0.0.1:0",
        "--admin",
        f"127.0.0.1:{admin}",
        "--metrics-listen",
        f"127.0.0.1:{metrics}",
        "--state-dir",
        str(tmp / f"state-{secrets.token_hex(4)}"),
        "--app-health",
        "none",
        "--log-level",
        "warning",
    ]
    env = clean_env()
    if table is not None:
        args += ["--table", str(table)]
    if cp is not None:
        args += ["--control-plane", cp.url]
        env["MESHLET_TOKEN"] = cp.token(service)
    proc = subprocess.Popen(args, env=env)
    try:
        ready = f"http://127.0.0.1:{admin}/readyz"  # ready: listening, with a table
        wait_until(lambda: urllib.request.urlopen(ready, timeout=1).status == 200, "a sidecar")
        if cp is not None:
            wait_until(lambda: cp.applied(service, admin), "the table applied", timeout=180)
        for _ in range(scrapes):
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=30) as r:
                r.read()
        time.sleep(1.0)
        return rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(60)


def bare(*modules: str) -> float:
    """The RSS in MB of a process that imports ``modules`` and waits."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys, {', '.join(modules)}; print(flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        time.sleep(0.2)
        return rss_mb(proc.pid)
    finally:
        proc.kill()
        proc.wait(10)


def bytecode_as_installed(tmp: Path) -> None:
    """Processes started from here find meshlet's own modules compiled, as an installed
    package has them (pip compiles at install). With PYTHONDONTWRITEBYTECODE set (or a
    read-only tree), every start compiled them from source, which left ~5 MB more RSS."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(tmp / "pycache")
    sources = [package_dir(name) for name in ("sidecar", "control_plane")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", *sources], check=True)


def package_dir(name: str) -> str:
    spec = importlib.util.find_spec(name)
    assert spec is not None
    assert spec.origin is not None
    return str(Path(spec.origin).parent)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--services", type=int, default=1000)
    parser.add_argument("--endpoints", type=int, default=10)
    parser.add_argument("--scrapes", type=int, default=3, help="of the scraped row's sidecar")
    args = parser.parse_args()
    n, k = args.services, args.endpoints
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    empty_cp = loaded_cp = None
    results: dict[str, list[float]] = {}
    try:
        bytecode_as_installed(tmp)
        empty_cp, loaded_cp = ControlPlane(), ControlPlane()
        started = time.monotonic()
        loaded_cp.register(n, k)
        print(f"registered {n} x {k} instances in {time.monotonic() - started:.0f} s")
        empty = tmp / "empty.json"
        empty.write_text('{"services": {}}')
        big = table_file(tmp / "big.json", n, k)
        label = f"{n}x{k}"
        measures: dict[str, Callable[[], float]] = {
            "python": lambda: bare("asyncio", "uvloop"),
            "deps": lambda: bare("asyncio", "uvloop", "httptools", "xxhash", "ssl"),
            "push idle": lambda: sidecar(tmp, cp=empty_cp),
            f"push {label}": lambda: sidecar(tmp, cp=loaded_cp),
            f"push {label} scraped": lambda: sidecar(tmp, cp=loaded_cp, scrapes=args.scrapes),
            "file idle": lambda: sidecar(tmp, table=empty),
            f"file {label}": lambda: sidecar(tmp, table=big),
        }
        for run in range(args.runs):
            for name, measure in measures.items():  # interleaved: drift hits all alike
                results.setdefault(name, []).append(measure())
            print(f"run {run + 1}: " + ", ".join(f"{m} {v[-1]:.1f}" for m, v in results.items()))
    finally:
        for cp in (empty_cp, loaded_cp):
            if cp is not None:
                cp.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    python, deps = (statistics.median(results[peer]) for peer in ("python", "deps"))
    print()
    print(
        f"{'RSS, MB':<24} {'min':>6} {'median':>7} {'max':>6} {'- python':>9} {'- deps':>7} "
        f"{'goal':>6}"
    )
    for name, values in results.items():
        peer = name in ("python", "deps")
        goal = "" if peer else f"<= {GOALS['idle' if 'idle' in name else 'loaded']:.0f}"
        mid = statistics.median(values)
        print(
            f"{name:<24} {min(values):>6.1f} {mid:>7.1f} {max(values):>6.1f} "
            f"{mid - python:>9.1f} {mid - deps:>7.1f} {goal:>6}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
