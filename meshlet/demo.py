"""``meshlet demo``: a whole mesh on this machine, under steady traffic, losing instances.

It starts a control plane (SQLite in a temp dir), three ``catalog`` instances and a
``frontend`` (the sample apps in ``meshlet.samples``, each with its own sidecar), sends 50
requests/s to the frontend, which asks catalog through its sidecar, and shows each second what
each catalog instance serves and what the control plane and the frontend's sidecar make of it.
A quarter of the way through each cycle (30 s, or the whole ``--duration`` when shorter) it
kills a catalog instance with ``kill -9`` (the first time app and sidecar, the next time only
the app: ``meshlet.demo_scenario``), and no client sees an error; just past half way it starts
it again, and slow start gives it a growing share. At the end: a summary.

``meshlet demo --ha`` runs the control plane as three replicas on one Redis instead
(``meshlet.demo_ha``): sidecars are given all three, and three quarters of the way through
each cycle the replica that reaps is killed with ``kill -9``; another takes its lease, its
sidecars' streams move, and still no client sees an error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

from control_plane.wire import HASH_POLICIES, LB_POLICIES, default_instance_id
from meshlet import demo_ha
from meshlet import demo_view as view
from meshlet.demo_mesh import START_TIMEOUT, Mesh
from meshlet.demo_scenario import CATALOGS, KILL_AT, RESTART_AT, SLOW_START, Scenario, summary
from meshlet.demo_traffic import Traffic, percentile

T = TypeVar("T")
CYCLE = 30.0
"""seconds of one kill-and-restart cycle (shorter when ``--duration`` is)"""
NO_TTY_DURATION = 30.0
"""seconds a run without a terminal lasts unless ``--duration`` says otherwise"""
LB = "peak_ewma"
"""catalog's balancing policy in the demo (meshlet's default); ``--lb`` picks another"""


class Stopped(Exception):
    """Ctrl-C (or SIGTERM) came before the demo had started."""


@dataclass(frozen=True)
class Plan:
    cycle: float
    """seconds"""
    rate: float
    """requests per second"""
    lb: str

    @property
    def slow_start_s(self) -> float:
        return round(self.cycle * SLOW_START, 1)

    def policy(self) -> dict[str, Any]:
        """catalog's policy: short ejections and slow start, so both show within a cycle"""
        return {
            "lb": self.lb,
            "retries": 1,
            "outlier": {"base_ejection_ms": 5000},
            "slow_start_ms": int(self.slow_start_s * 1000),
        }


async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, T]) -> T:
    """``work``'s result, or Stopped when ``stop`` is set first (``work`` is cancelled)."""
    task = asyncio.ensure_future(work)
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, waiter], return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise Stopped
    return task.result()


async def _start(
    mesh: Mesh,
    port: int,
    plan: Plan,
    http: aiohttp.ClientSession,
    redis: demo_ha.Redis | None,
) -> str:
    """Control plane (replicas on ``redis``), catalog policy, three catalogs, then the
    frontend; the frontend's inbound URL once a request through it works."""
    if redis is None:
        url = await mesh.start_control_plane(port)
    else:
        url = await mesh.start_replicas(port, redis.store, demo_ha.LEASE_TTL, demo_ha.REPLICAS)
    policy = plan.policy()
    async with http.put(f"{url}/v1/services/catalog/policy", json=policy, headers=mesh.auth) as r:
        if r.status != 200:
            raise RuntimeError(f"catalog policy refused: {r.status} {await r.text()}")
    for service in ("catalog", "frontend"):
        await mesh.mint_token(http, service)
    async with asyncio.TaskGroup() as tasks:
        for name in CATALOGS:
            tasks.create_task(mesh.start_instance("catalog", name))
    await _poll(lambda: _healthy_catalogs(http, mesh), "three healthy catalog instances")
    frontend = await mesh.start_instance("frontend", "frontend-1")
    inbound = f"http://127.0.0.1:{frontend.ports['inbound']}/"
    await _poll(lambda: _answers(http, inbound), "an answer through the frontend")
    return inbound


async def _healthy_catalogs(http: aiohttp.ClientSession, mesh: Mesh) -> bool:
    async with http.get(f"{mesh.url}/v1/services/catalog/instances", headers=mesh.auth) as r:
        listed = await r.json()
    healthy = [i for i in listed["instances"] if i["status"] == "healthy"]
    return len(healthy) == len(CATALOGS)


async def _answers(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(url) as r:
        return r.status == 200


async def _poll(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while True:
                with contextlib.suppress(aiohttp.ClientError, ValueError, KeyError):
                    if await check():
                        return
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise RuntimeError(f"no {what} within {START_TIMEOUT:.0f} s") from None


def _intro(
    mesh: Mesh, inbound: str, plan: Plan, repeat: bool, keep: bool, redis: demo_ha.Redis | None
) -> list[str]:
    cp = mesh.url
    frontend = mesh.instances["frontend-1"]
    lines = [""]
    if redis is None:
        pid = mesh.control_plane.pid if mesh.control_plane else "-"
        lines.append(f"  control plane  {cp}  (pid {pid})")
    else:
        lines += [
            f"  {r.name:<13}  {r.url}  (pid {r.child.pid}), a control-plane replica"
            for r in mesh.replicas.values()
        ]
        where = f"pid {redis.server.pid}, the demo's own" if redis.server else "yours"
        lines.append(f"  {'redis':<13}  {redis.url}  ({where}; keys under {redis.prefix}:)")
    for name, i in mesh.instances.items():
        lines.append(
            f"  {name:<13}  app pid {i.app.pid}, sidecar pid {i.sidecar.pid}: inbound :"
            f"{i.ports['inbound']}, outbound :{i.ports['outbound']}, admin {i.admin_url}"
        )
    cut = KILL_AT * plan.cycle
    back = RESTART_AT * plan.cycle
    drain = shlex.quote('{"status": "draining"}')
    undrain = shlex.quote('{"status": "healthy"}')
    first = default_instance_id("127.0.0.1", mesh.instances["catalog-1"].ports["inbound"])
    catalog_1 = f"{cp}/v1/services/catalog/instances/{first}"
    json_header = "-H 'Content-Type: application/json'"
    auth = f'-H "Authorization: Bearer $(cat {shlex.quote(str(mesh.admin_token_file))})"'
    sidecar_metrics = ", ".join(i.metrics_url for i in mesh.instances.values())
    lines += [
        "",
        f"The demo sends {plan.rate:g} requests/s to frontend (its sidecar's inbound, {inbound});",
        "frontend asks catalog for items through its own sidecar, which balances over the three",
        f"catalog instances ({plan.lb}) with the routing table the control plane pushes to it.",
        f"At {cut:g} s catalog-2 is killed (kill -9, app and sidecar): requests on their way",
        "there are retried on another instance, and the control plane drops it from the table.",
        f"At {back:g} s it is restarted, and slow start gives it a growing share over "
        f"{plan.slow_start_s:g} s.",
        "Every hop between two sidecars is mutual TLS 1.3, with certificates the control plane",
        "signs and each sidecar renews (its /config_dump shows its identity; each app learns its",
        "caller from x-meshlet-peer).",
        *(_ha_intro(mesh, plan, redis) if redis is not None else []),
        *(
            [
                f"Every {plan.cycle:g} s the next instance, alternately a whole one and only its "
                "app: then its",
                "sidecar answers 502 for it, and the frontend's sidecar retries and ejects it.",
            ]
            if repeat
            else []
        ),
        "",
        "Try these while it runs (the REST API with the demo's admin token, the frontend, the",
        "frontend sidecar's balancer):",
        f"  curl -s {auth} {cp}/v1/services",
        f"  curl -s {auth} {cp}/v1/services/catalog/instances",
        f"  curl -s {auth} {cp}/v1/table",
        f"  curl -s {auth} {cp}/v1/sidecars",
        f"  curl -s {auth} {cp}/v1/tokens",
        f"  curl -s {inbound}",
        f"  curl -s {frontend.admin_url}/clusters",
        f"  curl -s -X PATCH {auth} {catalog_1} {json_header} -d {drain}",
        f"  curl -s -X PATCH {auth} {catalog_1} {json_header} -d {undrain}",
        f"  MESHLET_CONTROL_PLANE={cp} MESHLET_ADMIN_TOKEN_FILE={mesh.admin_token_file} "
        "meshlet ctl instances catalog",
        "",
        f"REST API: {cp}/v1/... (described by {cp}/openapi.json)"
        + ("; every replica serves all of it" if redis is not None else ""),
        f"Prometheus metrics: {', '.join(f'{u}/metrics' for u in mesh.urls)} (control plane); "
        f"{sidecar_metrics} (sidecars)",
        f"Logs of every process: {mesh.logs}"
        + ("" if keep else " (removed at the end; --keep keeps them)"),
    ]
    return lines


def _ha_intro(mesh: Mesh, plan: Plan, redis: demo_ha.Redis) -> list[str]:
    kill = demo_ha.KILL_AT * plan.cycle
    back = demo_ha.RESTART_AT * plan.cycle
    return [
        "",
        f"The control plane is {len(mesh.replicas)} replicas on one Redis (the demo's keys there "
        "are removed at the end).",
        "Each sidecar holds its push stream on one replica and knows them all; one replica "
        "reaps (it holds",
        f"the reaper's lease, {mesh.lease_ttl:g} s). At {kill:g} s that one is killed (kill -9): "
        "another takes the lease once",
        "it lapses, the sidecars whose streams were on it move to another at once, and the "
        "traffic does not",
        f"notice. At {back:g} s it is restarted, as a follower.",
    ]


def _summary(traffic: Traffic, scenario: Scenario, elapsed: float) -> list[str]:
    stats = traffic.statistics()
    ms = sorted(s * 1000 for s in traffic.latencies)
    lines = [
        "",
        f"meshlet demo: summary after {elapsed:.1f} s",
        f"  requests        {stats.sent} sent at {traffic.rate:g}/s, {stats.answered} answered, "
        f"client errors {stats.errors}",
    ]
    if stats.skipped:
        lines.append(f"  not sent        {stats.skipped}: {traffic.max_in_flight} were in flight")
    if ms:
        p50, p99 = percentile(ms, 0.5), percentile(ms, 0.99)
        lines.append(
            f"  latency         p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.0f} ms "
            "(each through three sidecar hops and two apps)"
        )
    shown = ", ".join(f"{n} {traffic.by_catalog[n]}" for n in CATALOGS)
    lines.append(f"  answered by     {shown}")
    lines += [f"  client error    status {e.status} {e.error}" for e in traffic.failed[:5]]
    return lines + summary(traffic, scenario.outages, scenario.cycle)


async def _demo(args: argparse.Namespace, tty: bool) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
    duration = args.duration if args.duration is not None else (None if tty else NO_TTY_DURATION)
    plan = Plan(cycle=min(CYCLE, duration) if duration else CYCLE, rate=args.rate, lb=args.lb)
    with contextlib.ExitStack() as cleanup:
        if args.keep:
            root = tempfile.mkdtemp(prefix="meshlet-demo-")
        else:
            root = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="meshlet-demo-"))
        mesh = Mesh(Path(root))
        redis = None
        if args.ha:
            try:
                redis = await demo_ha.connect(args.redis, Path(root), _say)
            except demo_ha.NoRedis as e:
                print(f"meshlet demo: {e}", file=sys.stderr, flush=True)
                return 2
            what = f"three control-plane replicas on Redis ({redis.url})"
        else:
            what = "a control plane"
        _say(f"meshlet demo: starting {what} and four sample apps with sidecars in {root}")
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                inbound = await _until(stop, _start(mesh, args.port, plan, http, redis))
                repeat = duration is None or duration > plan.cycle
                _say(*_intro(mesh, inbound, plan, repeat, args.keep, redis))
                when = f" (or it ends by itself after {duration:g} s)" if duration else ""
                _say(f"Ctrl-C stops the demo{when}.", "")
                await _run(mesh, http, inbound, plan, duration, stop, tty)
        except Stopped:
            _say("meshlet demo: stopped before it had started")
        finally:
            await mesh.close()
            if redis is not None:
                _say(await redis.forget())
    _say("meshlet demo: stopped")
    return 0


async def _run(
    mesh: Mesh,
    http: aiohttp.ClientSession,
    inbound: str,
    plan: Plan,
    duration: float | None,
    stop: asyncio.Event,
    tty: bool,
) -> None:
    traffic = Traffic(inbound, plan.rate)
    events: list[str] = []
    screen = view.Screen()

    def event(text: str) -> None:
        line = f"  {time.monotonic() - traffic.started_at:5.1f} s  {text}"
        events.append(line)
        if not tty:
            _say(line)

    scenario = Scenario(mesh, traffic, http, plan.cycle, event)
    takeovers = demo_ha.Takeovers(mesh, traffic, http, plan.cycle, event) if mesh.ha else None
    footer = "Ctrl-C stops the demo" + (f"; it ends at {duration:g} s" if duration else "")

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - traffic.started_at
            snap = await view.observe(http, mesh, traffic, elapsed)
            if tty:
                screen.draw(view.frame(snap, events, footer))
            else:
                _say("  " + view.status_line(snap))

    async with asyncio.TaskGroup() as tasks:
        driving = tasks.create_task(traffic.run(), name="traffic")
        helpers = [
            tasks.create_task(watch(), name="watch"),
            tasks.create_task(scenario.run(), name="scenario"),
        ]
        if takeovers is not None:
            helpers.append(tasks.create_task(takeovers.run(), name="takeovers"))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration):
                await stop.wait()
        for task in helpers:
            task.cancel()
        traffic.stop()
        await driving
    elapsed = time.monotonic() - traffic.started_at
    _say(*_summary(traffic, scenario, elapsed), await _mtls_line(http, mesh))
    if takeovers is not None:
        _say(*takeovers.summary())


_QUICK = aiohttp.ClientTimeout(total=2)


async def _mtls_line(http: aiohttp.ClientSession, mesh: Mesh) -> str:
    """What mutual TLS did between the sidecars still running: who holds a certificate, and
    the sessions their inbound listeners opened and refused."""
    holders, opened, failed = [], 0.0, 0.0
    for name, instance in mesh.instances.items():
        if not instance.sidecar.alive:
            continue
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
            async with http.get(f"{instance.admin_url}/config_dump", timeout=_QUICK) as r:
                identity = (await r.json()).get("identity") or {}
            if identity.get("spiffe_id"):
                holders.append(name)
            async with http.get(instance.metrics_url, timeout=_QUICK) as r:
                for line in (await r.text()).splitlines():
                    if line.startswith('meshlet_listener_tls_handshakes_total{direction="inbound"'):
                        if 'result="ok"' in line:
                            opened += float(line.rsplit(" ", 1)[1])
                        else:
                            failed += float(line.rsplit(" ", 1)[1])
    return (
        f"  mutual TLS      {len(holders)} sidecars hold a certificate; {opened:.0f} sessions "
        f"opened between sidecars, {failed:.0f} refused"
    )


def _say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(
        prog="meshlet demo",
        description="Run a whole mesh on this machine (a control plane; frontend and three "
        "catalog instances, each with its sidecar) under steady traffic, kill a catalog "
        "instance and restart it, and show what the mesh does about it.",
    )
    parser.add_argument(
        "--duration",
        "--seconds",
        type=float,
        default=None,
        metavar="S",
        help=f"stop after S seconds of traffic (default: at Ctrl-C on a terminal, "
        f"else {NO_TTY_DURATION:g})",
    )
    parser.add_argument(
        "--no-tty", action="store_true", help="a status line per second instead of a live view"
    )
    parser.add_argument("--rate", type=float, default=50.0, help="requests/s (default 50)")
    parser.add_argument(
        "--lb",
        choices=[p for p in LB_POLICIES if p not in HASH_POLICIES],  # requests carry no key
        default=LB,
        help=f"how the frontend's sidecar balances over catalog (default {LB})",
    )
    parser.add_argument("--port", type=int, default=0, help="control plane port (default: free)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, store)")
    parser.add_argument(
        "--ha",
        action="store_true",
        help=f"run the control plane as {demo_ha.REPLICAS} replicas on Redis and kill the one "
        "that reaps once a cycle",
    )
    parser.add_argument(
        "--redis",
        metavar="URL",
        help=f"with --ha: the Redis (default {demo_ha.DEFAULT_REDIS}, else a private "
        "redis-server when one is installed); the demo's keys get a prefix of their own and "
        "are removed at the end; a password from MESHLET_REDIS_PASSWORD(_FILE)",
    )
    args = parser.parse_args(argv)
    if args.redis is not None and not args.ha:
        parser.error("--redis goes with --ha")
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be more than 0")
    if not 0 < args.rate <= 1000:
        parser.error("--rate must be more than 0 and at most 1000")
    tty = sys.stdout.isatty() and not args.no_tty
    failures: list[BaseException] = []
    code = 0
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            code = runner.run(_demo(args, tty))
    except* (RuntimeError, OSError, aiohttp.ClientError) as group:
        failures.extend(group.exceptions)
    for e in failures:
        print(f"meshlet demo: error: {e}", file=sys.stderr)
    return 1 if failures else code
