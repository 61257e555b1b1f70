"""``meshlet demo --ha``: the control plane as three replicas on one Redis, and the replica that
reaps killed under traffic.

``connect`` finds the Redis (``--redis``, else ``redis://127.0.0.1:6379/0``; with nothing
there, a private ``redis-server`` of the demo's when one is installed, said so). The demo's keys
live under a prefix of their own (``meshlet-demo-<random>:``), which ``Redis.erase`` removes at
the end, so a run touches no other data in that database.

``Takeovers`` is the script's second part: once a cycle, three quarters of the way through, it
kills (``kill -9``) the replica that holds the reaper's lease, then watches another take the
lease (within the lease's TTL) and the sidecars whose streams were on the dead one move to the
others (at once: the stream's failover), and restarts it near the end of the cycle. The
client's errors meanwhile are counted, and there are none: no request needs the control plane.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import shutil
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from control_plane.errors import ConfigError
from meshlet.demo_mesh import REDIS_PASSWORD_ENV, START_TIMEOUT, Child, Mesh, free_port
from meshlet.demo_traffic import Traffic

if TYPE_CHECKING:  # the redis package is an extra (meshlet[redis]): imported when --ha runs
    import redis.asyncio as aioredis

    from control_plane.store_redis import RedisStore

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
REPLICAS = 3
LEASE_TTL = 3.0
"""seconds: the reaper's lease in the demo (``--lease-ttl``), short so that a takeover shows"""
KILL_AT, RESTART_AT = 0.75, 0.95
"""fractions of a cycle: when the reaping replica is killed, when it is started again"""
POLL = 0.05
"""seconds between looks at the replicas and the sidecars while a takeover runs"""
PROBE_TIMEOUT = 2.0
"""seconds the first PING to Redis may take"""
REAPER = re.compile(r"^meshlet_replica_reaper (\S+)$", re.M)
GET_REDIS = (
    "start one (apt-get install redis-server, or docker run -d -p 6379:6379 redis:7) "
    "or name one with --redis redis://HOST:PORT/DB"
)


class NoRedis(Exception):
    """No Redis to run the replicas on: the one line that says so (and how to get one)."""


@dataclass
class Redis:
    """The Redis the replicas share, and the demo's part of it."""

    url: str
    """the server, as the replicas' ``--store`` names it (without the prefix)"""
    prefix: str
    """the demo's keys start with this and a colon"""
    client: aioredis.Redis
    server: Child | None = None
    """the demo's private ``redis-server``, when it started one"""

    @property
    def store(self) -> str:
        """The replicas' ``--store``."""
        parts = urllib.parse.urlsplit(self.url)
        query = [*urllib.parse.parse_qsl(parts.query), ("prefix", self.prefix)]
        return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))

    async def forget(self) -> str:
        """Remove the demo's keys (every replica has stopped), stop a private redis-server;
        what became of the keys, in a line."""
        from redis.exceptions import RedisError

        try:
            if self.server is not None:
                return f"meshlet demo: stopped its redis-server (pid {self.server.pid})"
            removed = await self.erase()
            return f"meshlet demo: removed its {removed} keys ({self.prefix}:*) from {self.url}"
        except (OSError, RedisError) as e:
            return f"meshlet demo: could not remove its keys ({self.prefix}:*) from {self.url}: {e}"
        finally:
            await self.close()

    async def erase(self) -> int:
        """Remove every key under the demo's prefix; how many there were."""
        removed = 0
        batch: list[str] = []
        async for key in self.client.scan_iter(match=f"{self.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                removed += await self.client.unlink(*batch)
                batch = []
        if batch:
            removed += await self.client.unlink(*batch)
        return removed

    async def close(self) -> None:
        await self.client.aclose()
        if self.server is not None:
            await self.server.stop()


def _password() -> str | None:
    """What the replicas will read (``control_plane.store_redis``), for the demo's own
    connection; the replicas are given the same environment variable."""
    password, path = (os.environ.get(name) for name in REDIS_PASSWORD_ENV)
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise NoRedis(f"cannot read {REDIS_PASSWORD_ENV[1]} {path}: {e}") from None
    return password or None


def _client(store: RedisStore, ssl_ca_certs: str | None) -> aioredis.Redis:
    import redis.asyncio as aioredis

    options: dict[str, Any] = {
        "socket_timeout": PROBE_TIMEOUT,
        "socket_connect_timeout": PROBE_TIMEOUT,
        "decode_responses": True,
        "password": _password(),
    }
    if ssl_ca_certs:
        options["ssl_ca_certs"] = ssl_ca_certs
    return aioredis.Redis.from_url(store.url, **options)


async def _ping(client: aioredis.Redis) -> str | None:
    """None when Redis answers; else what went wrong, in a few words."""
    from redis.exceptions import RedisError

    try:
        async with asyncio.timeout(PROBE_TIMEOUT + 1):
            await client.ping()
    except (RedisError, OSError, TimeoutError) as e:
        return str(e) or type(e).__name__
    return None


async def connect(given: str | None, root: Path, say: Callable[..., None]) -> Redis:
    """The Redis at ``given`` (``--redis``), or at ``DEFAULT_REDIS``, or else a private
    ``redis-server`` in ``root`` when one is installed and ``--redis`` named none; NoRedis
    when there is none."""
    url = given or DEFAULT_REDIS
    if not url.startswith(("redis://", "rediss://")):
        raise NoRedis(f"--redis: {url[:100]!r} is not a redis:// or rediss:// URL")
    try:
        from control_plane.store_redis import RedisStore
    except ImportError:
        raise NoRedis("--ha needs the redis package: pip install 'meshlet[redis]'") from None
    try:
        store = RedisStore.from_url(url)
    except ConfigError as e:
        raise NoRedis(f"--redis: {e.message}") from None
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)
    if "prefix" in query:
        raise NoRedis("--redis: leave out ?prefix=: the demo picks a prefix of its own")
    ca = query.get("ssl_ca_certs", [""])[-1] or None
    prefix = f"meshlet-demo-{secrets.token_hex(4)}"
    client = _client(store, ca)
    failed = await _ping(client)
    if failed is None:
        return Redis(url, prefix, client)
    await client.aclose()
    binary = shutil.which("redis-server")
    shown = _shown(failed)
    if given is not None or binary is None:
        raise NoRedis(f"--ha needs a Redis server and {url} does not answer ({shown}): {GET_REDIS}")
    server, private = await _private(binary, root)
    say(
        f"meshlet demo: nothing answers at {url} ({shown}); started a private redis-server "
        f"for this run at {private} (pid {server.pid}; --redis URL uses yours)"
    )
    client = _client(RedisStore.from_url(private), None)
    return Redis(private, prefix, client, server)


def _shown(error: str) -> str:
    """An error's first line, short."""
    line = error.strip().splitlines()[0] if error.strip() else "no answer"
    return line[:160]


async def _private(binary: str, root: Path) -> tuple[Child, str]:
    """A ``redis-server`` on a free loopback port that keeps nothing on disk, stopped with
    the demo (it dies with the demo too: ``PR_SET_PDEATHSIG``)."""
    where = root / "redis"
    where.mkdir(exist_ok=True)
    port = free_port()
    argv = [
        binary,
        "--bind", "127.0.0.1",
        "--port", str(port),
        "--dir", str(where),
        "--save", "",
        "--appendonly", "no",
    ]  # fmt: skip
    server = await Child.start("redis-server", argv, root / "logs" / "redis-server.log")
    url = f"redis://127.0.0.1:{port}/0"
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while await _ping(client) is not None:
            if not server.alive or time.monotonic() > deadline:
                await server.stop()
                tail = " / ".join(server.log().splitlines()[-3:])
                raise NoRedis(f"--ha: the private redis-server did not start: {tail}")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()
    return server, url


# -- what the replicas do, seen from outside ----------------------------------------------


async def _metrics(http: aiohttp.ClientSession, url: str) -> str | None:
    try:
        async with http.get(f"{url}/metrics") as r:
            return await r.text() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def _ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with http.get(f"{url}/readyz") as r:
            return r.status == 200
    except (aiohttp.ClientError, TimeoutError):
        return False


@dataclass(frozen=True, slots=True)
class ReplicaState:
    name: str
    port: int
    process: str
    """``up`` or ``killed``"""
    reaper: bool
    """it holds the reaper's lease"""
    ready: bool
    """its ``/readyz`` answers 200"""
    streams: tuple[str, ...]
    """the instances whose sidecars' streams are on it"""


async def replica_states(http: aiohttp.ClientSession, mesh: Mesh) -> list[ReplicaState]:
    """Each replica: running or not, reaper or not, ready or not, and whose streams it holds
    (each sidecar's ``/config_dump`` says which replica its stream is on)."""
    replicas = list(mesh.replicas.values())
    instances = [i for i in mesh.instances.values() if i.sidecar.alive]
    metrics, ready, dumps = await asyncio.gather(
        asyncio.gather(*(_metrics(http, r.url) for r in replicas)),
        asyncio.gather(*(_ready(http, r.url) for r in replicas)),
        asyncio.gather(*(_connected_to(http, i.admin_url) for i in instances)),
    )
    on: dict[str, list[str]] = {}
    for instance, url in zip(instances, dumps, strict=True):
        if url is not None:
            on.setdefault(url, []).append(instance.name)
    states = []
    for replica, text, up in zip(replicas, metrics, ready, strict=True):
        found = REAPER.search(text or "") if replica.alive else None
        states.append(
            ReplicaState(
                name=replica.name,
                port=replica.port,
                process="up" if replica.alive else "killed",
                reaper=found is not None and float(found.group(1)) == 1,
                ready=up and replica.alive,
                streams=tuple(sorted(on.get(replica.url, []))),
            )
        )
    return states


async def _connected_to(http: aiohttp.ClientSession, admin: str) -> str | None:
    """The URL of the replica a sidecar's stream is on (None: between two, or no answer)."""
    try:
        async with http.get(f"{admin}/config_dump") as r:
            dump = await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    control = (dump or {}).get("control_plane") or {}
    connected = control.get("connected_to") or {}
    url = connected.get("url")
    return url if isinstance(url, str) else None


# -- the script ---------------------------------------------------------------------------


@dataclass
class Takeover:
    """One kill of the reaping replica and what followed; times are monotonic seconds."""

    name: str
    pid: int
    killed_at: float
    streams: tuple[str, ...]
    """the instances whose sidecars' streams were on it"""
    new_reaper: str | None = None
    reaper_at: float | None = None
    moved: dict[str, str] = field(default_factory=dict)
    """instance -> the replica its stream moved to"""
    moved_at: float | None = None
    restarted_at: float | None = None
    pid_after: int | None = None


class Takeovers:
    def __init__(
        self,
        mesh: Mesh,
        traffic: Traffic,
        http: aiohttp.ClientSession,
        cycle: float,
        event: Callable[[str], None],
    ) -> None:
        self.mesh = mesh
        self.traffic = traffic
        self.http = http
        self.cycle = cycle
        self.event = event
        self.done: list[Takeover] = []

    def __repr__(self) -> str:
        return f"<Takeovers [every {self.cycle:g} s, {len(self.done)} so far]>"

    async def run(self) -> None:
        for k in itertools.count():
            start = self.traffic.started_at + k * self.cycle
            await _sleep_until(start + KILL_AT * self.cycle)
            takeover = await self.kill_reaper()
            if takeover is None:
                continue
            restart_at = start + RESTART_AT * self.cycle
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, restart_at - time.monotonic())):
                    await self.watch(takeover)
            await _sleep_until(restart_at)
            await self.restart(takeover)

    async def kill_reaper(self) -> Takeover | None:
        states = await replica_states(self.http, self.mesh)
        reaper = next((s for s in states if s.reaper), None)
        if reaper is None:
            self.event("no replica holds the reaper's lease just now: none killed this cycle")
            return None
        pid = await self.mesh.kill_replica(reaper.name)
        takeover = Takeover(reaper.name, pid, time.monotonic(), reaper.streams)
        self.done.append(takeover)
        held = ", ".join(reaper.streams) or "none"
        self.event(
            f"kill -9 {reaper.name}, the replica that reaps (pid {pid}); streams on it: {held}"
        )
        return takeover

    async def watch(self, t: Takeover) -> None:
        """Until another replica reaps and every sidecar that was on the dead one is on
        another."""
        while t.reaper_at is None or t.moved_at is None:
            await asyncio.sleep(POLL)
            states = await replica_states(self.http, self.mesh)
            now = time.monotonic()
            reaper = next((s for s in states if s.reaper), None)
            if t.reaper_at is None and reaper is not None:
                t.new_reaper, t.reaper_at = reaper.name, now
                self.event(
                    f"{reaper.name} reaps: it took the lease {_s(now - t.killed_at)} after the "
                    f"kill (lease TTL {self.mesh.lease_ttl:g} s)"
                )
            if t.moved_at is None:
                where = {name: s.name for s in states for name in s.streams}
                if all(name in where for name in t.streams):
                    t.moved = {name: where[name] for name in t.streams}
                    t.moved_at = now
                    if t.streams:
                        shown = ", ".join(f"{n} to {r}" for n, r in t.moved.items())
                        self.event(f"streams moved {_s(now - t.killed_at)} after the kill: {shown}")

    async def restart(self, t: Takeover) -> None:
        t.restarted_at = time.monotonic()

        def spawned(pid: int) -> None:
            t.pid_after = pid
            self.event(f"restart {t.name} (on its old port; pid {pid})")

        await self.mesh.restart_replica(t.name, spawned)
        self.event(f"{t.name} is up again: a follower now")

    def summary(self) -> list[str]:
        lines = []
        for t in self.done:
            at = t.killed_at - self.traffic.started_at
            lines.append(f"  kill -9         {t.name}, the replica that reaps, at {at:.1f} s")
            if t.reaper_at is not None:
                lines.append(
                    f"  new reaper      {t.new_reaper} after {_s(t.reaper_at - t.killed_at)} "
                    f"(lease TTL {self.mesh.lease_ttl:g} s)"
                )
            else:
                lines.append("  new reaper      none before the restart")
            if not t.streams:
                lines.append("  streams         none was on it")
            elif t.moved_at is not None:
                shown = ", ".join(f"{n} to {r}" for n, r in t.moved.items())
                lines.append(
                    f"  streams         moved after {_s(t.moved_at - t.killed_at)}: {shown}"
                )
            until = t.restarted_at or float("inf")
            failed = [r for r in self.traffic.failed if t.killed_at <= r.started < until]
            lines.append(
                f"  meanwhile       client errors {len(failed)} until its restart"
                + (
                    f" at {t.restarted_at - self.traffic.started_at:.1f} s"
                    if t.restarted_at
                    else ""
                )
            )
        return lines


def _s(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 2 else f"{seconds:.1f} s"


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
