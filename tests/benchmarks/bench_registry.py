"""REST heartbeats per second a control plane absorbs per core: on SQLite, on Redis, and as
three replicas on one Redis, beside a raw Redis pipeline.

One private redis-server and every control plane run pinned to core 0; the load generator
runs on core 1 (the machine has 2 cores). Each deployment holds 1,000 instances of 50
services; the same client code drives every row over C keep-alive connections, one request in
flight per connection:
  - sqlite:   one control plane, SQLite store in a temp dir (``--store sqlite:///...``)
  - redis:    one control plane on the Redis store (``--store redis://...?prefix=one:``)
  - replicas: three control planes on that same Redis (``?prefix=three:``), all three on core
              0: they share the one core a single control plane gets, so their sum is
              heartbeats/s per replica core; the connections are spread over them
              round-robin, as a load balancer in front of them would
  - raw:      ``HSET hb:{svc}:{id} ts <now>`` + ``PEXPIRE hb:{svc}:{id} 15000`` in one write,
              straight to the redis-server
  (meshlet rows: ``PUT /v1/services/{svc}/instances/{id}/heartbeat``)
Rounds alternate between the four; each prints min/median/max over the rounds, and the
ratios are medians of the per-round ratios: the Redis store against SQLite, and heartbeats/s
per replica core against SQLite, one control plane on Redis and raw Redis. Goals: >= 5,000
heartbeats/s on SQLite and >= 0.2x the raw Redis figure. The Redis rows have no goal of their
own in issue 14; they say what the store and replication cost: a heartbeat is memory-only on
every store (a replica shares the ones it heard in one batch every 0.25 s), so the Redis
store should match SQLite, and three replicas on one core pay for three processes' event
loops, following the change stream and sharing heartbeats, which shows as their sum against
one control plane's. When the machine is busy the client's core limits every row and the
ratios drift toward 1: compare runs on a quiet machine.

Every control plane runs with ``--heartbeat-ttl 60 --remove-after 600``: a deployment idles
while the others are measured, and its instances must not lapse meanwhile (a lapse would
rebuild and push tables, and a removal would turn heartbeats into 404s).

Tokens are on, as a user runs a control plane: an admin token in its environment, which
mints one service token per service; each instance registers and heartbeats with its
service's token (``Authorization: Bearer mlt_...``: a SHA-256 and a dict lookup per call).
``--no-tokens`` runs open control planes (no token configured, no header sent) instead, to
measure what tokens cost.

Run: .venv/bin/python tests/benchmarks/bench_registry.py [--rounds 5] [--seconds 3] [--no-tokens]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
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
from collections.abc import Callable, Coroutine
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
    ports: list[int],
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

        _, proto = await loop.create_connection(factory, "127.0.0.1", ports[c % len(ports)])
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


def start_control_plane(port: int, store: str, admin_token: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "control_plane",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            store,
            "--heartbeat-ttl",
            "60",
            "--remove-after",
            "600",
            "--log-level",
            "warning",
        ],
        preexec_fn=pinned(SERVER_CORE),
        env=control_plane_env(admin_token),
    )


def start_redis(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    """A private redis-server on core 0, nothing saved to disk."""
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    argv += ["--appendonly", "no", "--dir", str(tmp)]
    proc = subprocess.Popen(argv, preexec_fn=pinned(SERVER_CORE), stdout=subprocess.DEVNULL)
    for _ in range(100):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not come up")


def heartbeat_ok(port: int, token: str) -> bool:
    """Whether the control plane on ``port`` knows the last instance registered (and its
    service's token): a replica that has followed every registration."""
    i = INSTANCES - 1
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/services/svc-{i % SERVICES}/instances/inst-{i}/heartbeat",
        method="PUT",
        headers=auth,
    )
    try:
        with urllib.request.urlopen(req, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def deploy(ports: list[int], admin_token: str) -> list[str]:
    """Tokens minted and instances registered through the first control plane; the others
    waited for until they have followed it all. The service tokens (none if open)."""
    base = f"http://127.0.0.1:{ports[0]}"
    tokens = mint_tokens(base, admin_token) if admin_token else []
    register_all(base, tokens)
    last_token = tokens[(INSTANCES - 1) % SERVICES] if tokens else ""
    deadline = time.monotonic() + 30
    for port in ports:
        while not heartbeat_ok(port, last_token):
            if time.monotonic() > deadline:
                raise RuntimeError(f"control plane on port {port} never saw the instances")
            time.sleep(0.1)
    return tokens


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to each, then SIGKILL to any still running 15 s later (said on stderr: a
    control plane should stop within its 10 s shutdown timeout)."""
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + 15.0
    for proc in procs:
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"pid {proc.pid} still running 15 s after SIGTERM: killed", file=sys.stderr)
            proc.kill()
            proc.wait()


def spread(values: list[float]) -> str:
    return f"{min(values):8.0f} {statistics.median(values):8.0f} {max(values):8.0f}"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--no-tokens",
        action="store_true",
        help="open control planes: no token configured, heartbeats without one",
    )
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server not found (apt-get install redis-server)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})
    tmp = Path(tempfile.mkdtemp(prefix="bench-registry-"))
    redis_port = free_port()
    redis_url = f"redis://127.0.0.1:{redis_port}/0"
    admin_token = "" if args.no_tokens else secrets.token_urlsafe(32)
    stores = {
        "sqlite": [f"sqlite:///{tmp}/meshlet.db"],
        "redis": [f"{redis_url}?prefix=one:"],
        "replicas": [f"{redis_url}?prefix=three:"] * 3,
    }
    procs = [start_redis(redis_port, tmp)]
    try:
        ports: dict[str, list[int]] = {}
        for row, urls in stores.items():
            ports[row] = [free_port() for _ in urls]
            procs += [
                start_control_plane(p, u, admin_token)
                for p, u in zip(ports[row], urls, strict=True)
            ]
        for row in stores:
            for port in ports[row]:
                wait_http(f"http://127.0.0.1:{port}/readyz")
        requests = {row: heartbeat_requests(deploy(ports[row], admin_token)) for row in stores}
        rows: dict[str, Callable[[float], Coroutine[Any, Any, float]]] = {
            row: functools.partial(
                drive, ports[row], args.connections, make=requests[row], done=http_done
            )
            for row in stores
        }
        rows["raw"] = functools.partial(
            drive, [redis_port], args.connections, make=redis_request, done=redis_done
        )
        rates: dict[str, list[float]] = {row: [] for row in rows}
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            for measure in rows.values():
                runner.run(measure(1.0))  # warm
            for r in range(args.rounds):
                for row, measure in rows.items():
                    rates[row].append(runner.run(measure(args.seconds)))
                print(
                    f"round {r + 1}: "
                    + "  ".join(f"{row} {rate[-1]:7.0f}/s" for row, rate in rates.items())
                )

        def ratio(a: str, b: str) -> float:
            return statistics.median(x / y for x, y in zip(rates[a], rates[b], strict=True))

        auth = "none (open control planes)" if args.no_tokens else "a service token each"
        print(
            f"\nheartbeats/s over {args.rounds} rounds x {args.seconds:g}s, "
            f"{args.connections} keep-alive connections from core 1; redis-server and every "
            f"control plane on core 0; tokens: {auth}:"
        )
        print(f"  {'':38} {'min':>8} {'median':>8} {'max':>8}")
        for label, row, goal in (
            ("meshlet on SQLite (1 control plane)", "sqlite", " (goal >= 5000)"),
            ("meshlet on Redis (1 control plane)", "redis", ""),
            ("3 replicas on Redis, sharing 1 core", "replicas", ""),
            ("raw redis HSET+PEXPIRE", "raw", ""),
        ):
            print(f"  {label:38} {spread(rates[row])}{goal}")
        print("medians of the per-round ratios:")
        for label, a, b, goal in (
            ("SQLite store / raw redis", "sqlite", "raw", " (goal >= 0.2)"),
            ("Redis store / SQLite store", "redis", "sqlite", ""),
            ("3 replicas per core / SQLite store", "replicas", "sqlite", ""),
            ("3 replicas per core / 1 on Redis", "replicas", "redis", ""),
            ("3 replicas per core / raw redis", "replicas", "raw", ""),
        ):
            print(f"  {label:38} {ratio(a, b):8.3f}{goal}")
    finally:
        stop(procs[1:])
        stop(procs[:1])  # redis-server last: its clients first
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
