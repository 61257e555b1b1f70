"""REST heartbeats per second one control-plane process absorbs on one core, beside Redis.

The control plane (SQLite store in a temp dir, 1,000 instances of 50 services) and a private
redis-server each run pinned to core 0; the load generator runs on core 1. The same client
code drives both over C keep-alive connections, one request in flight per connection:
  - meshlet: ``PUT /v1/services/{svc}/instances/{id}/heartbeat``
  - Redis:   ``HSET hb:{svc}:{id} ts <now>`` + ``PEXPIRE hb:{svc}:{id} 15000`` in one write
Rounds alternate between the two; the result is the median of the per-round ratios.
Goals: >= 5,000 heartbeats/s and >= 0.2x the Redis figure.

Tokens are on, as a user runs a control plane: an admin token in its environment, which
mints one service token per service; each instance registers and heartbeats with its
service's token (``Authorization: Bearer mlt_...``: a SHA-256 and a dict lookup per call).
``--no-tokens`` runs an open control plane (no token configured, no header sent) instead, to
measure what tokens cost.

Run: .venv/bin/python tests/benchmarks/bench_registry.py [--rounds 5] [--seconds 3] [--no-tokens]
"""

from __future__ import annotations

import argparse
import asyncio
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
from pathlib import Path
from typing import Any, cast

import uvloop

INSTANCES = 1000
SERVICES = 50
SERVER_CORE = 0
CLIENT_CORE = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def pinned(core: int) -> Callable[[], None]:
    return lambda: os.sched_setaffinity(0, {core})


class Client(asyncio.Protocol):
    """One keep-alive connection sending one request at a time, as fast as answers come."""

    def __init__(self, make: Callable[[int], bytes], done: Callable[[bytes], bool]) -> None:
        self.make, self.done = make, done
        self.buf = b""
        self.count = 0
        self.stop_at = 0.0
        self.finished: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def go(self, stop_at: float) -> None:
        self.stop_at = stop_at
        self.transport.write(self.make(self.count))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.done(self.buf):
            return
        self.buf = b""
        self.count += 1
        if time.monotonic() < self.stop_at:
            self.transport.write(self.make(self.count))
        elif not self.finished.done():
            self.finished.set_result(self.count)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self.finished.set_exception(exc or ConnectionError("closed by server"))


def http_done(buf: bytes) -> bool:
    head, sep, body = buf.partition(b"\r\n\r\n")
    if not sep:
        return False
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected response: {buf[:200]!r}")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    return len(body) >= length


def redis_done(buf: bytes) -> bool:
    if buf.startswith(b"-"):
        raise RuntimeError(f"redis error: {buf!r}")
    return buf.count(b"\r\n") >= 2


async def drive(
    port: int,
    conns: int,
    seconds: float,
    make: Callable[[int, int], bytes],
    done: Callable[[bytes], bool],
) -> float:
    loop = asyncio.get_running_loop()
    clients = []
    for c in range(conns):

        def factory(c: int = c) -> Client:
            return Client(lambda n: make(c, n), done)

        _, proto = await loop.create_connection(factory, "127.0.0.1", port)
        clients.append(proto)
    start = time.monotonic()
    for client in clients:
        client.go(start + seconds)
    counts = await asyncio.gather(*(c.finished for c in clients))
    elapsed = time.monotonic() - start
    for client in clients:
        client.transport.close()
    return sum(counts) / elapsed


def heartbeat_requests(tokens: list[str]) -> Callable[[int, int], bytes]:
    """Heartbeats of every instance in turn, each with its service's token (none if
    ``tokens`` is empty: an open control plane)."""
    auth = [f"Authorization: Bearer {t}\r\n" for t in tokens] or [""] * SERVICES

    def heartbeat_request(conn: int, n: int) -> bytes:
        i = (conn * 7919 + n) % INSTANCES
        return (
            f"PUT /v1/services/svc-{i % SERVICES}/instances/inst-{i}/heartbeat HTTP/1.1\r\n"
            f"Host: cp\r\n{auth[i % SERVICES]}Content-Length: 0\r\n\r\n"
        ).encode()

    return heartbeat_request


def redis_request(conn: int, n: int) -> bytes:
    i = (conn * 7919 + n) % INSTANCES
    key = f"hb:svc-{i % 50}:inst-{i}"
    ts = str(time.time())

    def cmd(*args: str) -> str:
        return f"*{len(args)}\r\n" + "".join(f"${len(a)}\r\n{a}\r\n" for a in args)

    return (cmd("HSET", key, "ts", ts) + cmd("PEXPIRE", key, "15000")).encode()


def wait_http(url: str) -> None:
    for _ in range(100):
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def call(base: str, path: str, body: dict[str, Any], token: str) -> Any:
    """A POST with a JSON body, and ``token`` unless it is ""; the answer's JSON."""
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(
        base + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **auth},
    )
    with urllib.request.urlopen(req) as r:
        assert r.status == 201, r.status
        return json.loads(r.read())


def mint_tokens(base: str, admin_token: str) -> list[str]:
    """One service token per service, minted by the admin, as a user deploys them."""
    return [
        call(base, "/v1/tokens", {"service": f"svc-{s}"}, admin_token)["secret"]
        for s in range(SERVICES)
    ]


def register_all(base: str, tokens: list[str]) -> None:
    for i in range(INSTANCES):
        body = {"id": f"inst-{i}", "address": f"10.0.{i // 250}.{i % 250 + 1}", "port": 8080}
        token = tokens[i % SERVICES] if tokens else ""
        call(base, f"/v1/services/svc-{i % SERVICES}/instances", body, token)


def control_plane_env(admin_token: str) -> dict[str, str]:
    """This environment without any MESHLET_ setting, plus ``admin_token`` unless it is ""."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    return {**env, "MESHLET_ADMIN_TOKEN": admin_token} if admin_token else env


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--no-tokens",
        action="store_true",
        help="an open control plane: no token configured, heartbeats without one",
    )
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        print("redis-server not found (apt-get install redis-server)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})
    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    cp_port, redis_port = free_port(), free_port()
    wrap = os.environ.get("BENCH_WRAP", "").split()
    admin_token = "" if args.no_tokens else secrets.token_urlsafe(32)
    procs = [
        subprocess.Popen(
            [
                *wrap,
                sys.executable,
                "-m",
                "control_plane",
                "--listen",
                f"127.0.0.1:{cp_port}",
                "--store",
                f"sqlite:///{tmp}/meshlet.db",
                "--log-level",
                "warning",
            ],
            preexec_fn=pinned(SERVER_CORE),
            env=control_plane_env(admin_token),
        ),
        subprocess.Popen(
            [
                redis_server,
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(tmp),
            ],
            preexec_fn=pinned(SERVER_CORE),
            stdout=subprocess.DEVNULL,
        ),
    ]
    try:
        base = f"http://127.0.0.1:{cp_port}"
        wait_http(f"{base}/readyz")
        tokens = mint_tokens(base, admin_token) if admin_token else []
        register_all(base, tokens)
        heartbeat_request = heartbeat_requests(tokens)
        ratios, meshlet_rates, redis_rates = [], [], []
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(drive(cp_port, args.connections, 1.0, heartbeat_request, http_done))  # warm
            runner.run(drive(redis_port, args.connections, 1.0, redis_request, redis_done))
            for r in range(args.rounds):
                m = runner.run(
                    drive(cp_port, args.connections, args.seconds, heartbeat_request, http_done)
                )
                d = runner.run(
                    drive(redis_port, args.connections, args.seconds, redis_request, redis_done)
                )
                meshlet_rates.append(m)
                redis_rates.append(d)
                ratios.append(m / d)
                print(f"round {r + 1}: meshlet {m:8.0f}/s  redis {d:8.0f}/s  ratio {m / d:.3f}")
        auth = "none (open control plane)" if args.no_tokens else "a service token each"
        print(
            f"\nheartbeats/s, median of {args.rounds} rounds x {args.seconds:.0f}s, "
            f"{args.connections} keep-alive connections, server pinned to one core, "
            f"tokens: {auth}:\n"
            f"  meshlet control plane {statistics.median(meshlet_rates):8.0f}/s (goal >= 5000)\n"
            f"  redis HSET+PEXPIRE    {statistics.median(redis_rates):8.0f}/s\n"
            f"  median ratio          {statistics.median(ratios):8.3f}   (goal >= 0.2)"
        )
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
