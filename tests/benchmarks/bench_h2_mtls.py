"""HTTP/2 between two sidecars: inside mesh TLS (ALPN h2) against h2c, measured in the same run.

nginx serves a 1 KiB body as the backend; a control plane signs the sidecars' certificates.
Two pairs of services, each a caller's sidecar A and a callee's sidecar B with the policy
``protocol: http2`` (the hop A -> B is HTTP/2; B calls the backend over HTTP/1.1):
  h2c    both sidecars --mtls off: the hop is h2c
  h2tls  both sidecars --mtls on: the hop is h2 inside mutual TLS 1.3, checked before
         measuring (B's ``meshlet_listener_tls_sessions_total{alpn="h2"}``, and the
         x-meshlet-peer the backend is given)
h2load (h2c to A's outbound, pinned with the backend and the control plane to CPU 0) sends
the same number of requests to each pair per round; both sidecars of a pair are pinned to
CPU 1. Printed per round: requests/s and CPU-seconds per 1,000 requests of the pair; then
min/median/max of the per-round ratio h2tls / h2c (the cost of mTLS on a kept HTTP/2
connection; issue 15's goal for HTTP/1.1 is <= 1.3x).

Run: .venv/bin/python tests/benchmarks/bench_h2_mtls.py [--rounds 5] [--requests 20000]
Needs nginx, h2load (nghttp2-client) and taskset.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: ``tests`` from the repo root

from tests.benchmarks import mesh_tls  # noqa: E402
from tests.benchmarks.bench_proxy import LOAD_CORE, Lab, Pair, cpu_seconds  # noqa: E402

PAIRS = (("h2c", "off"), ("h2tls", "on"))


def set_policy(cp: tuple[str, str], service: str, policy: dict[str, Any]) -> None:
    url, token = cp
    req = urllib.request.Request(
        f"{url}/v1/services/{service}/policy",
        data=json.dumps(policy).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        method="PUT",
    )
    with urllib.request.urlopen(req, timeout=5) as r:
        assert r.status == 200


def speaks_http2(admin_port: int, service: str) -> bool:
    data = json.loads(mesh_tls.get(f"http://127.0.0.1:{admin_port}/config_dump"))
    entry = ((data.get("table") or {}).get("services") or {}).get(service) or {}
    return bool((entry.get("policy") or {}).get("protocol") == "http2")


def h2load(port: int, authority: str, requests: int) -> tuple[float, int]:
    """(requests/s, requests that succeeded): 4 connections, 10 streams each."""
    out = subprocess.run(
        [
            *("taskset", "-c", LOAD_CORE, "h2load", "-n", str(requests), "-c", "4", "-m", "10"),
            *("-H", f":authority: {authority}", f"http://127.0.0.1:{port}/"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", out)
    status = re.search(r"status codes: (\d+) 2xx", out)
    if rps is None or done is None or status is None or int(status.group(1)) != requests:
        raise RuntimeError(f"h2load saw failures:\n{out}")
    return float(rps.group(1)), int(done.group(1))


def check_hops(lab: Lab, pairs: dict[str, Pair]) -> None:
    """The h2tls hop is h2 inside mesh TLS (the callee counts an h2 session, the backend is
    given the verified caller); the h2c hop is HTTP/2 without TLS."""
    assert lab.pki is not None
    for prefix, pair in pairs.items():
        h2load(pair.outbound, pair.service, 100)
        sessions = mesh_tls.metric(
            pair.b_metrics, "meshlet_listener_tls_sessions_total", alpn="h2", direction="inbound"
        )
        h2 = mesh_tls.metric(pair.b_metrics, "meshlet_h2_connections_total", direction="inbound")
        tls = prefix == "h2tls"
        if h2 < 1 or (sessions >= 1) != tls:
            raise RuntimeError(f"{prefix}: {h2:.0f} HTTP/2 connections, {sessions:.0f} over TLS")
    mesh_tls.check_hop(
        pairs["h2tls"].outbound,
        pairs["h2tls"].service,
        pairs["h2tls"].b_metrics,
        lab.pki.identity(pairs["h2tls"].caller),
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000)
    args = parser.parse_args()
    for tool in ("nginx", "h2load", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install nginx nghttp2-client)", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="bench-h2-mtls-"))
    tmp.chmod(0o755)  # nginx workers run as nobody and serve the body from here
    lab = Lab(tmp)
    cpu: dict[str, list[float]] = {prefix: [] for prefix, _ in PAIRS}
    try:
        lab.backend()
        lab.pki = mesh_tls.make_pki(tmp)
        cp = lab.control_plane(lab.pki)
        pairs: dict[str, Pair] = {}
        for prefix, mtls in PAIRS:
            pair = lab.mesh_pair(cp, prefix, mtls)
            set_policy(cp, pair.service, {"protocol": "http2"})
            pairs[prefix] = pair
        for pair in pairs.values():
            admin, service = _admin_port(lab, pair), pair.service
            mesh_tls.wait_until(
                lambda admin=admin, service=service: speaks_http2(admin, service),  # type: ignore[misc]
                f"{pair.caller} calls {service} over HTTP/2",
            )
        check_hops(lab, pairs)
        for rnd in range(args.rounds):
            for prefix, pair in pairs.items():
                pids = pair.processes()
                before = cpu_seconds(pids)
                rps, done = h2load(pair.outbound, pair.service, args.requests)
                per_1000 = (cpu_seconds(pids) - before) / done * 1000
                cpu[prefix].append(per_1000)
                print(
                    f"round {rnd + 1} {prefix:<6} {rps:8.0f} req/s  cpu/1k {per_1000:.3f} s",
                    flush=True,
                )
        ratios = [t / c for t, c in zip(cpu["h2tls"], cpu["h2c"], strict=True)]
        for prefix, values in cpu.items():
            print(f"{prefix:<6} cpu/1k min/median/max {_mmm(values, '.3f')} s")
        print(f"h2tls / h2c CPU per request: min/median/max {_mmm(ratios, '.2f')}")
    finally:
        lab.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _admin_port(lab: Lab, pair: Pair) -> int:
    """A's admin port, read off its command line (``mesh_pair`` keeps no other record)."""
    argv = Path(f"/proc/{pair.a.pid}/cmdline").read_bytes().split(b"\0")
    return int(argv[argv.index(b"--admin") + 1].rsplit(b":", 1)[1])


def _mmm(values: list[float], form: str) -> str:
    return " / ".join(
        format(v, form) for v in (min(values), statistics.median(values), max(values))
    )


if __name__ == "__main__":
    sys.exit(main())
