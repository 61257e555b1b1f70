"""Pushing routing tables to N sidecars, beside Redis PUBLISH to N subscribers.

A control plane (memory store, default debounce: 100 ms quiet, 2 s max) runs pinned to CPU 0.
N lightweight simulated sidecars (WebSocket clients that read a table's version and ACK it,
without parsing the rest) run in this process on CPU 1; each registers an instance, so the
table holds N endpoints across 50 services, as a real mesh of N sidecars would.

  flip       one instance's weight changes over REST; the time until each sidecar has the new
             version: p50, p99, max, with the default debounce, and again with a control
             plane whose debounce is off (--debounce-quiet 0.001): the transport alone
  floor      Redis PUBLISH of a message of the table's size to N subscribers (raw RESP
             clients in this same process): until each has all of it
  burst      100 weight changes within 1 s: tables each sidecar receives (goal <= 2) and
             whether the final table has the final weight

  replicas   the same flip through control planes on one Redis (issue 14): one control plane
             on the Redis store, and three replicas on one Redis with the sidecars spread over
             them round-robin and the change made on the first; flips alternate between the
             two deployments (both up, each with its own N sidecars), with the default
             debounce and again with it off. The time until each sidecar has a table of a
             version at least the one the first replica published: p50 and p99 of each, the
             ratio p99(3 replicas) / p99(1) over all flips (goal <= 1.5x) and the median of
             the per-flip ratios. The three replicas and redis-server share CPU 0, the core a
             single control plane gets; the sidecars of both deployments run on CPU 1.

A sidecar's memory with a 1,000 x 10 table is bench_memory.py's.

Tokens are on, as a user runs a mesh: each control plane has an admin token in its
environment, the benchmark's REST calls carry it, and every sidecar (simulated or real) opens
its stream with a service token of its own service, minted by the admin.

Run: .venv/bin/python tests/benchmarks/bench_push.py [--sizes 100,1000] [--flips 5]
         [--replica-flips 10] [--only memory|replicas]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import aiohttp
import uvloop

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: ``tests`` from the repo root

from tests.benchmarks.bench_registry import stop  # noqa: E402

CP_CORE, CLIENT_CORE = 0, 1
SERVICES = 50
VERSION = re.compile(rb'"version":(\d+),"epoch"')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str) -> None:
    for _ in range(200):
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


def wait_redis(port: int) -> None:
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"redis-server on port {port} did not come up")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


class SimSidecar:
    """Registers, then ACKs every table, noting when each version arrived."""

    def __init__(self, n: int, token: str) -> None:
        self.n = n
        self.service = f"svc-{n % SERVICES}"
        self.token = token
        """a service token of ``service``"""
        self.arrived: dict[int, float] = {}
        self.tables = 0
        self.last_payload = b""

    async def run(self, http: aiohttp.ClientSession, url: str, ready: asyncio.Future[None]) -> None:
        """Until cancelled; ``ready`` holds the outcome of connecting (a refused token, say)."""
        try:
            await self._session(http, url, ready)
        except Exception as e:
            if not ready.done():
                ready.set_exception(
                    RuntimeError(f"sim-{self.n} did not connect: {type(e).__name__}: {e}")
                )
            raise

    async def _session(
        self, http: aiohttp.ClientSession, url: str, ready: asyncio.Future[None]
    ) -> None:
        async with http.ws_connect(
            f"{url}/v1/stream", max_msg_size=0, headers=bearer(self.token)
        ) as ws:
            hello = {
                "type": "hello",
                "node": f"sim-{self.n}",
                "service": self.service,
                "instance": {"id": f"i{self.n}", "address": "127.0.0.1", "port": 10000 + self.n},
                "version": 0,
                "health": "healthy",
            }
            await ws.send_str(json.dumps(hello))
            welcome = await ws.receive()
            if welcome.type is not aiohttp.WSMsgType.TEXT or '"welcome"' not in welcome.data:
                raise RuntimeError(f"sim-{self.n}: no welcome: {welcome.type} {welcome.data!r}")
            ready.set_result(None)
            beats = asyncio.create_task(self._heartbeats(ws))
            try:
                await self._tables(ws)
            finally:
                beats.cancel()

    async def _heartbeats(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            await asyncio.sleep(5.0)
            await ws.send_str('{"type":"heartbeat","health":"healthy"}')

    async def _tables(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for msg in ws:
            data = msg.data.encode() if isinstance(msg.data, str) else msg.data
            found = VERSION.search(data[-80:])
            if found is None:
                continue
            version = int(found.group(1))
            self.arrived[version] = time.monotonic()
            self.tables += 1
            self.last_payload = data
            await ws.send_str(f'{{"type":"ack","version":{version}}}')


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def mint(http: aiohttp.ClientSession, url: str, admin: str, service: str) -> str:
    """A new service token's secret, minted with the admin token."""
    async with http.post(f"{url}/v1/tokens", json={"service": service}, headers=bearer(admin)) as r:
        assert r.status == 201, await r.text()
        secret: str = (await r.json())["secret"]
        return secret


async def current_version(http: aiohttp.ClientSession, url: str, admin: str) -> int:
    async with http.get(f"{url}/v1/table", headers=bearer(admin)) as r:
        assert r.status == 200, await r.text()
        return int((await r.json())["version"])


async def settle(sims: list[SimSidecar], version: int) -> None:
    deadline = time.monotonic() + 30.0
    while any(version not in s.arrived for s in sims):
        if time.monotonic() > deadline:
            missing = sum(version not in s.arrived for s in sims)
            raise RuntimeError(f"{missing} sidecars never got version {version}")
        await asyncio.sleep(0.01)


async def push_rounds(
    url: str, admin: str, n: int, flips: int, burst: bool
) -> tuple[list[float], int]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        # one token per service, shared by its sidecars, as a user deploys them
        tokens = [await mint(http, url, admin, f"svc-{s}") for s in range(SERVICES)]
        sims = [SimSidecar(i, tokens[i % SERVICES]) for i in range(n)]
        loop = asyncio.get_running_loop()
        readies: list[asyncio.Future[None]] = [loop.create_future() for _ in sims]
        tasks = [
            asyncio.create_task(s.run(http, url, e)) for s, e in zip(sims, readies, strict=True)
        ]
        for start in range(0, n, 100):  # connect in waves, as a fleet starts
            await asyncio.gather(*readies[start : start + 100])
        await asyncio.sleep(3.0)  # registrations debounced and pushed
        await settle(sims, await current_version(http, url, admin))
        latencies: list[float] = []
        rest: list[float] = []
        for f in range(flips):
            flip_at = time.monotonic()
            async with http.patch(
                f"{url}/v1/services/svc-0/instances/i0",
                json={"weight": 50 + f},
                headers=bearer(admin),
            ) as r:
                assert r.status == 200, await r.text()
            # REST reads while the new table goes out to every sidecar
            while time.monotonic() - flip_at < 0.4:
                started = time.monotonic()
                async with http.get(f"{url}/v1/services", headers=bearer(admin)) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                rest.append(time.monotonic() - started)
                await asyncio.sleep(0.005)
            version = await current_version(http, url, admin)
            await settle(sims, version)
            latencies += [s.arrived[version] - flip_at for s in sims]
            await asyncio.sleep(0.3)
        table_bytes = len(sims[0].last_payload)
        if not burst:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            return latencies, table_bytes
        # a burst: 100 changes within a second
        before = [s.tables for s in sims]
        for w in range(100):
            async with http.patch(
                f"{url}/v1/services/svc-0/instances/i0",
                json={"weight": 1 + w},
                headers=bearer(admin),
            ) as r:
                assert r.status == 200
            await asyncio.sleep(0.009)
        await asyncio.sleep(2.5)
        version = await current_version(http, url, admin)
        await settle(sims, version)
        burst_tables = max(s.tables - b for s, b in zip(sims, before, strict=True))
        final = json.loads(sims[-1].last_payload)["services"]["svc-0"]["endpoints"]
        final_ok = [e["weight"] for e in final if e["instance"] == "i0"] == [100]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(
        f"  N={n}: table {table_bytes / 1024:.0f} KiB; burst of 100 changes in ~1 s: at most "
        f"{burst_tables} tables per sidecar (goal <= 2), final table right: {final_ok}; "
        f"GET /v1/services while tables go out: p50 {statistics.median(rest) * 1000:.1f} ms, "
        f"max {max(rest) * 1000:.1f} ms"
    )
    return latencies, table_bytes


async def redis_floor(port: int, n: int, size: int, rounds: int) -> list[float]:
    """Time from PUBLISH to each of N subscribers having the whole message."""
    loop = asyncio.get_running_loop()
    payload = b"x" * size
    expected = len(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$%d\r\n" % size) + size + 2
    done: list[asyncio.Future[float]] = []

    class Sub(asyncio.Protocol):
        def __init__(self) -> None:
            self.got = 0
            self.subscribed = False
            self.future: asyncio.Future[float] | None = None

        def data_received(self, data: bytes) -> None:
            if not self.subscribed:
                self.subscribed = True  # the SUBSCRIBE confirmation
                return
            self.got += len(data)
            if self.got >= expected and self.future is not None and not self.future.done():
                self.future.set_result(time.monotonic())

    subs = []
    for _ in range(n):
        transport, sub = await loop.create_connection(Sub, "127.0.0.1", port)
        transport.write(b"*2\r\n$9\r\nSUBSCRIBE\r\n$2\r\nch\r\n")
        subs.append((transport, sub))
    await asyncio.sleep(1.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    latencies: list[float] = []
    for _ in range(rounds):
        done = [loop.create_future() for _ in subs]
        for (_, sub), fut in zip(subs, done, strict=True):
            sub.got = 0
            sub.future = fut
        start = time.monotonic()
        writer.write(b"*3\r\n$7\r\nPUBLISH\r\n$2\r\nch\r\n$%d\r\n%s\r\n" % (size, payload))
        await reader.readline()
        latencies += [t - start for t in await asyncio.gather(*done)]
        await asyncio.sleep(0.3)
    writer.close()
    for transport, _ in subs:
        transport.close()
    return latencies


class Deployment:
    """N simulated sidecars spread round-robin over the control planes at ``urls`` (replicas
    of one registry), tokens minted and changes made through the first."""

    def __init__(self, name: str, urls: list[str], admin: str) -> None:
        self.name = name
        self.urls = urls
        self.admin = admin
        self.sims: list[SimSidecar] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.latencies: list[float] = []
        """every sidecar's convergence time of every flip, seconds"""
        self.p99s: list[float] = []
        """each flip's p99 over the sidecars, seconds"""

    async def start(self, http: aiohttp.ClientSession, n: int) -> None:
        tokens = [await mint(http, self.urls[0], self.admin, f"svc-{s}") for s in range(SERVICES)]
        for url in self.urls[1:]:  # the others follow the minting through Redis
            deadline = time.monotonic() + 10.0
            while len(await self._tokens(http, url)) < SERVICES:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} never saw the tokens minted on {self.urls[0]}")
                await asyncio.sleep(0.05)
        self.sims = [SimSidecar(i, tokens[i % SERVICES]) for i in range(n)]
        loop = asyncio.get_running_loop()
        readies: list[asyncio.Future[None]] = [loop.create_future() for _ in self.sims]
        self.tasks = [
            asyncio.create_task(s.run(http, self.urls[s.n % len(self.urls)], ready))
            for s, ready in zip(self.sims, readies, strict=True)
        ]
        async with asyncio.timeout(60.0):
            for start in range(0, n, 100):  # connect in waves, as a fleet starts
                await asyncio.gather(*readies[start : start + 100])

    async def settle(self, http: aiohttp.ClientSession) -> None:
        """Until every sidecar has its replica's current table (replicas that built a table
        of other content in the meantime have claimed other versions)."""
        for k, url in enumerate(self.urls):
            version = await current_version(http, url, self.admin)
            await settle_at_least(self.sims[k :: len(self.urls)], version)

    async def _tokens(self, http: aiohttp.ClientSession, url: str) -> list[object]:
        async with http.get(f"{url}/v1/tokens", headers=bearer(self.admin)) as r:
            assert r.status == 200, await r.text()
            tokens: list[object] = (await r.json())["tokens"]
            return tokens

    async def flip(self, http: aiohttp.ClientSession, weight: int) -> None:
        """One weight change through the first replica; the time until each sidecar has a
        table at least as new as the first one that replica published after it."""
        first = self.sims[0]  # connected to the first replica
        before = max(first.arrived)
        flip_at = time.monotonic()
        async with http.patch(
            f"{self.urls[0]}/v1/services/svc-0/instances/i0",
            json={"weight": weight},
            headers=bearer(self.admin),
        ) as r:
            assert r.status == 200, await r.text()
        deadline = flip_at + 30.0
        while max(first.arrived) == before:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: no table after the change")
            await asyncio.sleep(0.005)
        version = min(v for v in first.arrived if v > before)
        await settle_at_least(self.sims, version)
        flip = [min(t for v, t in s.arrived.items() if v >= version) - flip_at for s in self.sims]
        self.latencies += flip
        self.p99s.append(percentile(flip, 99))
        for s in self.sims[: len(self.urls)]:  # one sidecar of each replica: the content
            endpoints = json.loads(s.last_payload)["services"]["svc-0"]["endpoints"]
            weights = [e["weight"] for e in endpoints if e["instance"] == "i0"]
            if weights != [weight]:
                raise RuntimeError(f"{self.name}: sim-{s.n} has weight {weights}, not {weight}")

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def settle_at_least(sims: list[SimSidecar], version: int) -> None:
    deadline = time.monotonic() + 30.0
    while any(max(s.arrived, default=0) < version for s in sims):
        if time.monotonic() > deadline:
            missing = sum(max(s.arrived, default=0) < version for s in sims)
            raise RuntimeError(f"{missing} sidecars never got version {version} or newer")
        await asyncio.sleep(0.01)


async def replica_rounds(one: Deployment, three: Deployment, n: int, flips: int) -> None:
    """Flips alternating between the two deployments, each settled before the next."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        try:
            for deployment in (one, three):
                await deployment.start(http, n)
            await asyncio.sleep(3.0)  # registrations debounced and pushed
            for deployment in (one, three):
                await deployment.settle(http)
            for f in range(flips):
                for deployment in (one, three):
                    await deployment.flip(http, 50 + f)
                    await asyncio.sleep(0.3)
        finally:
            for deployment in (one, three):
                await deployment.stop()


def compare_replicas(redis_port: int, admin: str, n: int, flips: int) -> list[str]:
    """One control plane on Redis against three replicas on the same Redis, with the
    default debounce and with it off; a line each."""
    lines = []
    for label, debounce in (
        ("default debounce", ()),
        ("debounce off", ("--debounce-quiet", "0.001", "--debounce-max", "0.001")),
    ):
        tag = secrets.token_hex(3)
        one_store = f"redis://127.0.0.1:{redis_port}/0?prefix=one-{tag}:"
        three_store = f"redis://127.0.0.1:{redis_port}/0?prefix=three-{tag}:"
        ports = [free_port() for _ in range(4)]
        stores = [one_store, three_store, three_store, three_store]
        cps = [
            start_control_plane(port, admin, *debounce, store=store)
            for port, store in zip(ports, stores, strict=True)
        ]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        one = Deployment("1 control plane", urls[:1], admin)
        three = Deployment("3 replicas", urls[1:], admin)
        try:
            for url in urls:
                wait_http(f"{url}/readyz")
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(replica_rounds(one, three, n, flips))
        finally:
            stop(cps)
        p99_one, p99_three = percentile(one.latencies, 99), percentile(three.latencies, 99)
        per_flip = statistics.median(t / o for t, o in zip(three.p99s, one.p99s, strict=True))
        lines.append(
            f"N={n} on Redis, {label}, {flips} flips each: 1 control plane p50 "
            f"{statistics.median(one.latencies) * 1000:.0f} ms, p99 {p99_one * 1000:.0f} ms; "
            f"3 replicas p50 {statistics.median(three.latencies) * 1000:.0f} ms, p99 "
            f"{p99_three * 1000:.0f} ms; p99(3)/p99(1) {p99_three / p99_one:.2f}x (goal <= "
            f"1.5x), median of per-flip ratios {per_flip:.2f}x"
        )
        print("  " + lines[-1])
    return lines


def clean_env() -> dict[str, str]:
    """This environment without any MESHLET_ setting, so only the benchmark's tokens count."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}


def start_control_plane(
    port: int, admin: str, *debounce: str, store: str = "memory"
) -> subprocess.Popen[bytes]:
    """A control plane with ``admin`` as its admin token, given in the environment."""
    return subprocess.Popen(
        [
            "taskset",
            "-c",
            str(CP_CORE),
            sys.executable,
            "-m",
            "control_plane",
            "--listen",
            f"127.0.0.1:{port}",
            "--store",
            store,
            "--log-level",
            "warning",
            *debounce,
        ],
        env={**clean_env(), "MESHLET_ADMIN_TOKEN": admin},
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--flips", type=int, default=5)
    parser.add_argument(
        "--replica-flips", type=int, default=10, help="flips of each deployment on Redis"
    )
    parser.add_argument(
        "--only",
        choices=("memory", "replicas"),
        help="memory: the memory-store rows and the Redis floor; replicas: the Redis rows",
    )
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        print("redis-server not found (apt-get install redis-server)", file=sys.stderr)
        return 2
    os.sched_setaffinity(0, {CLIENT_CORE})
    tmp = Path(tempfile.mkdtemp(prefix="bench-push-"))
    sizes = [int(x) for x in args.sizes.split(",")]
    lines: list[str] = []
    replica_lines: list[str] = []
    admin = secrets.token_urlsafe(32)
    try:
        for n in sizes:
            redis_port = free_port()
            redis = subprocess.Popen(
                [
                    "taskset",
                    "-c",
                    str(CP_CORE),
                    "redis-server",
                    "--port",
                    str(redis_port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--maxclients",
                    "10000",
                    "--client-output-buffer-limit",
                    "pubsub 0 0 0",
                ],
                stdout=subprocess.DEVNULL,
            )
            runs = {}
            try:
                wait_redis(redis_port)
                if args.only != "memory":
                    replica_lines += compare_replicas(redis_port, admin, n, args.replica_flips)
                if args.only == "replicas":
                    continue
                for label, debounce in (
                    ("default", ()),
                    ("off", ("--debounce-quiet", "0.001", "--debounce-max", "0.001")),
                ):
                    port = free_port()
                    cp = start_control_plane(port, admin, *debounce)
                    url = f"http://127.0.0.1:{port}"
                    try:
                        wait_http(f"{url}/readyz")
                        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                            runs[label] = runner.run(
                                push_rounds(url, admin, n, args.flips, burst=label == "default")
                            )
                    finally:
                        stop([cp])
                size = runs["off"][1]
                with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                    floor = runner.run(redis_floor(redis_port, n, size, args.flips))
            finally:
                redis.terminate()
                redis.wait(10)
            lat, off = runs["default"][0], runs["off"][0]
            lines.append(
                f"N={n} ({size / 1024:.0f} KiB tables): with the debounce p50 "
                f"{statistics.median(lat) * 1000:.0f} ms, p99 {percentile(lat, 99) * 1000:.0f} "
                f"ms, max {max(lat) * 1000:.0f} ms (goal p99 <= 1000 ms); debounce off p99 "
                f"{percentile(off, 99) * 1000:.0f} ms; Redis floor p99 "
                f"{percentile(floor, 99) * 1000:.0f} ms; ratio "
                f"{percentile(off, 99) / percentile(floor, 99):.1f}x (goal <= 3x)"
            )
        print()
        print("\n".join(lines + replica_lines))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
