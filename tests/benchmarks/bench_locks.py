"""Lock acquire+release cycles per second, beside a bare Redis lock (issue 14).

A control plane on SQLite (in a temp dir) and a sidecar of service ``bench`` run as real
processes; a private redis-server is the peer. One client at a time runs cycles of
take-then-release on one name, as fast as answers come:
  - sidecar:  ``POST /v1/locks/NAME`` then ``DELETE`` on the sidecar's admin port (what
              ``meshlet.locks.hold`` does), forwarded to the control plane
  - direct:   the same calls on the control plane's REST API (the admin token)
  - redis:    ``SET NAME TOKEN NX PX 10000`` then ``DEL NAME`` (a lock with no fencing token,
              no owner check on release: the least a lock can do)
Then ``--clients`` clients contend for one name through the sidecar (``wait_ms``), each
holding it for nothing but its release: the hand-off time is the total over the cycles.

Run: .venv/bin/python tests/benchmarks/bench_locks.py [--seconds 3] [--clients 50]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import redis.asyncio as redis

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: ``tests`` from the repo root

from tests.processes import ControlPlane, Sidecar, free_port  # noqa: E402


async def rate(cycle: Callable[[], Awaitable[None]], seconds: float) -> float:
    """Cycles per second, one at a time."""
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await cycle()
        done += 1
    return done / (time.perf_counter() - start)


def rest_cycle(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> Callable[[], Awaitable[None]]:
    async def cycle() -> None:
        async with http.post(url, json={"ttl_ms": 10_000}, headers=headers) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())["token"]
        async with http.delete(url, json={"token": token}, headers=headers) as r:
            assert r.status == 204, await r.text()

    return cycle


async def contend(http: aiohttp.ClientSession, url: str, clients: int) -> float:
    """Seconds for ``clients`` clients to take and release one name, all asking at once."""

    async def one() -> None:
        body = {"ttl_ms": 10_000, "wait_ms": 60_000}
        async with http.post(url, json=body) as r:
            assert r.status == 200, await r.text()
            token = (await r.json())["token"]
        async with http.delete(url, json={"token": token}) as r:
            assert r.status == 204

    start = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(clients)))
    return time.perf_counter() - start


async def measure(admin: str, direct: str, token: str, redis_port: int, args: Args) -> None:
    auth = {"Authorization": f"Bearer {token}"}
    store = redis.Redis(port=redis_port)
    await store.ping()

    async def redis_cycle() -> None:
        assert await store.set("bench", "1", nx=True, px=10_000)
        await store.delete("bench")

    async with aiohttp.ClientSession() as http:
        via_sidecar = await rate(rest_cycle(http, admin, {}), args.seconds)
        via_rest = await rate(rest_cycle(http, direct, auth), args.seconds)
        via_redis = await rate(redis_cycle, args.seconds)
        total = await contend(http, admin, args.clients)
    await store.aclose()
    print("acquire+release cycles/s, one client at a time:")
    print(f"  through the sidecar       {via_sidecar:8,.0f}")
    print(f"  control plane directly    {via_rest:8,.0f}")
    print(f"  redis SET NX PX + DEL     {via_redis:8,.0f}")
    ratios = f"sidecar / direct {via_sidecar / via_rest:.2f}x"
    print(f"  {ratios}, sidecar / redis {via_sidecar / via_redis:.3f}x")
    print(
        f"{args.clients} clients contending for one name through the sidecar: {total:.2f} s, "
        f"{total / args.clients * 1000:.1f} ms per hand-off"
    )


class Args(argparse.Namespace):
    seconds: float
    clients: int


def main(args: Args) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-locks-"))
    redis_port = free_port()
    redis_server = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    cp = ControlPlane(work / "logs", "--store", f"sqlite:///{work}/cp.db")
    sidecar = Sidecar(
        work / "logs",
        "--service", "bench", "--control-plane", cp.url, "--app", "http://127.0.0.1:9",
        "--app-health", "none", "--advertise", "127.0.0.1", "--state-dir", str(work / "s"),
        env=cp.sidecar_env("bench"),
    )  # fmt: skip
    try:
        time.sleep(0.3)  # (redis-server starts meanwhile)
        admin = f"http://127.0.0.1:{sidecar.ports['admin']}/v1/locks/bench"
        direct = f"{cp.url}/v1/services/bench/locks/direct"
        asyncio.run(measure(admin, direct, cp.admin_token, redis_port, args))
    finally:
        sidecar.stop()
        cp.stop()
        redis_server.terminate()
        redis_server.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--clients", type=int, default=50)
    main(parser.parse_args(namespace=Args()))
