"""``meshlet demo``: a whole mesh on this machine, under steady traffic, losing an instance.

It starts a control plane (SQLite in a temp dir), three ``catalog`` instances and a
``frontend`` (the sample apps in ``meshlet.samples``, each with its own sidecar), sends 50
requests/s to the frontend, which asks catalog through its sidecar, and shows each second what
every catalog instance serves and what the control plane and the frontend's sidecar think of
it. A quarter of the way through each cycle (30 s, or the whole ``--duration`` when shorter) it
kills one catalog instance, app and sidecar, with ``kill -9``: the requests that were on their
way there are retried on the others and the control plane drops it from the routing table,
and no client sees an error. Just past half way it starts the instance again, and slow start
gives it a growing share of the traffic. At the end: a summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import shlex
import signal
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import uvloop

from meshlet import demo_view as view
from meshlet.demo_mesh import START_TIMEOUT, Mesh
from meshlet.demo_traffic import Traffic, percentile

T = TypeVar("T")
CATALOGS = ("catalog-1", "catalog-2", "catalog-3")
VICTIMS = ("catalog-2", "catalog-3", "catalog-1")
"""killed in this order, one per cycle"""
CYCLE = 30.0
"""seconds of one kill-and-restart cycle (shorter when ``--duration`` is)"""
KILL_AT, RESTART_AT, SLOW_START = 0.25, 0.55, 0.3
"""fractions of a cycle: when the kill comes, when the restart, how long the slow start"""
NO_TTY_DURATION = 30.0
LB = "peak_ewma"


class Stopped(Exception):
    """Ctrl-C (or SIGTERM) came before the demo had started."""


@dataclass
class Outage:
    """One kill and what followed, in monotonic seconds."""

    name: str
    killed_at: float
    table_before: int | None = None
    out_at: float | None = None
    """when the frontend's sidecar no longer had it in its table"""
    table_after: int | None = None
    restarted_at: float | None = None
    back_at: float | None = None
    """when the frontend's sidecar had it in its table again"""
    answered_before_restart: int = 0
    answers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Plan:
    cycle: float
    rate: float
    lb: str

    @property
    def slow_start_s(self) -> float:
        return round(self.cycle * SLOW_START, 1)

    def policy(self) -> dict[str, Any]:
        return {
            "lb": self.lb,
            "retries": 1,
            "outlier": {"base_ejection_ms": 5000},
            "slow_start_ms": int(self.slow_start_s * 1000),
        }


class Scenario:
    """Kills an instance, measures the fail-over, restarts it and measures its return."""

    def __init__(
        self,
        mesh: Mesh,
        traffic: Traffic,
        http: aiohttp.ClientSession,
        plan: Plan,
        event: Callable[[str], None],
    ) -> None:
        self.mesh = mesh
        self.traffic = traffic
        self.http = http
        self.plan = plan
        self.event = event
        self.outages: list[Outage] = []

    async def run(self) -> None:
        t0 = self.traffic.started_at
        for k, name in enumerate(itertools.cycle(VICTIMS)):
            start = t0 + k * self.plan.cycle
            await _sleep_until(start + KILL_AT * self.plan.cycle)
            outage = await self.kill(name)
            await _sleep_until(start + RESTART_AT * self.plan.cycle)
            await self.restart(outage)

    def _at(self, when: float) -> float:
        return when - self.traffic.started_at

    async def kill(self, name: str) -> Outage:
        port = self.mesh.instances[name].ports["inbound"]
        before = await self._frontend_table()
        outage = Outage(name, time.monotonic(), table_before=before[0])
        self.outages.append(outage)
        app, sidecar = await self.mesh.kill(name)
        self.event(f"kill -9 {name}: its app (pid {app}) and its sidecar (pid {sidecar})")
        outage.out_at, outage.table_after = await self._watch_for(port, present=False)
        retried = [r for r in self.traffic.retried if r.started + r.seconds >= outage.killed_at]
        self.event(
            f"{name} out of the frontend sidecar's table (v{outage.table_after}) "
            f"{(outage.out_at - outage.killed_at) * 1000:.0f} ms after the kill; "
            f"{len(retried)} requests retried on another instance so far, "
            f"{len(self.traffic.failed)} client errors"
        )
        return outage

    async def restart(self, outage: Outage) -> None:
        name = outage.name
        outage.answered_before_restart = self.traffic.by_catalog[name]
        outage.restarted_at = time.monotonic()
        self.event(f"restart {name} (same port, so the same instance id)")
        instance = await self.mesh.restart(name)
        outage.back_at, version = await self._watch_for(instance.ports["inbound"], present=True)
        self.event(
            f"{name} back in the frontend sidecar's table (v{version}) "
            f"{outage.back_at - outage.restarted_at:.1f} s after the restart: slow start "
            f"ramps it from 10 % to its full share over {self.plan.slow_start_s:g} s"
        )

    async def _frontend_table(self) -> tuple[int | None, set[int]]:
        """The frontend sidecar's table version and the catalog ports it routes to."""
        admin = self.mesh.instances["frontend-1"].admin_url
        async with self.http.get(f"{admin}/config_dump") as r:
            dump = await r.json()
        table = dump.get("table") or {}
        catalog = table.get("services", {}).get("catalog", {})
        return table.get("version"), {e["port"] for e in catalog.get("endpoints", [])}

    async def _watch_for(self, port: int, *, present: bool) -> tuple[float, int | None]:
        """Poll the frontend's sidecar until ``port`` is (or is no longer) in its table."""
        while True:
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                version, ports = await self._frontend_table()
                if (port in ports) == present:
                    return time.monotonic(), version
            await asyncio.sleep(0.02)


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))


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


async def _start(mesh: Mesh, port: int, plan: Plan, http: aiohttp.ClientSession) -> str:
    """Control plane, catalog policy, three catalogs, then the frontend; the frontend's
    inbound URL once a request through it works."""
    url = await mesh.start_control_plane(port)
    async with http.put(f"{url}/v1/services/catalog/policy", json=plan.policy()) as r:
        if r.status != 200:
            raise RuntimeError(f"catalog policy refused: {r.status} {await r.text()}")
    async with asyncio.TaskGroup() as tasks:
        for name in CATALOGS:
            tasks.create_task(mesh.start_instance("catalog", name))
    await _poll(lambda: _healthy_catalogs(http, url), "three healthy catalog instances")
    frontend = await mesh.start_instance("frontend", "frontend-1")
    inbound = f"http://127.0.0.1:{frontend.ports['inbound']}/"
    await _poll(lambda: _answers(http, inbound), "an answer through the frontend")
    return inbound


async def _healthy_catalogs(http: aiohttp.ClientSession, url: str) -> bool:
    async with http.get(f"{url}/v1/services/catalog/instances") as r:
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


def _intro(mesh: Mesh, inbound: str, plan: Plan, repeat: bool, keep: bool) -> list[str]:
    cp = mesh.url
    frontend = mesh.instances["frontend-1"]
    lines = [
        "",
        f"  control plane  {cp}  (pid {mesh.control_plane.pid if mesh.control_plane else '-'})",
    ]
    for name, i in mesh.instances.items():
        lines.append(
            f"  {name:<13}  app pid {i.app.pid}, sidecar pid {i.sidecar.pid}: inbound :"
            f"{i.ports['inbound']}, outbound :{i.ports['outbound']}, admin {i.admin_url}"
        )
    cut = KILL_AT * plan.cycle
    back = RESTART_AT * plan.cycle
    drain = shlex.quote('{"status": "draining"}')
    undrain = shlex.quote('{"status": "healthy"}')
    catalog_1 = f"{cp}/v1/services/catalog/instances/127.0.0.1-" + str(
        mesh.instances["catalog-1"].ports["inbound"]
    )
    json_header = "-H 'Content-Type: application/json'"
    sidecar_metrics = ", ".join(f"{i.admin_url}/metrics" for i in mesh.instances.values())
    lines += [
        "",
        f"The demo sends {plan.rate:g} requests/s to frontend (its sidecar's inbound, {inbound});",
        "frontend asks catalog for items through its own sidecar, which balances over the three",
        f"catalog instances ({plan.lb}) with the routing table the control plane pushes to it.",
        f"At {cut:g} s catalog-2 is killed (kill -9, app and sidecar): requests on their way",
        "there are retried on another instance, and the control plane drops it from the table.",
        f"At {back:g} s it is restarted, and slow start gives it a growing share over "
        f"{plan.slow_start_s:g} s."
        + (f" Every {plan.cycle:g} s the next one, until you stop it." if repeat else ""),
        "",
        "Try these while it runs (the REST API, the frontend, the frontend sidecar's balancer):",
        f"  curl -s {cp}/v1/services",
        f"  curl -s {cp}/v1/services/catalog/instances",
        f"  curl -s {cp}/v1/table",
        f"  curl -s {cp}/v1/sidecars",
        f"  curl -s {inbound}",
        f"  curl -s {frontend.admin_url}/clusters",
        f"  curl -s -X PATCH {catalog_1} {json_header} -d {drain}",
        f"  curl -s -X PATCH {catalog_1} {json_header} -d {undrain}",
        f"  MESHLET_CONTROL_PLANE={cp} meshlet ctl instances catalog",
        "",
        f"REST API: {cp}/v1/... (described by {cp}/openapi.json)",
        f"Prometheus metrics: {cp}/metrics (control plane); {sidecar_metrics} (sidecars)",
        f"Logs of every process: {mesh.logs}"
        + ("" if keep else " (removed at the end; --keep keeps them)"),
    ]
    return lines


def _summary(traffic: Traffic, outages: list[Outage], elapsed: float, cycle: float) -> list[str]:
    stats = traffic.statistics()
    ms = sorted(s * 1000 for s in traffic.latencies)
    lines = [
        "",
        f"meshlet demo: summary after {elapsed:.1f} s",
        f"  requests        {stats.sent} sent at {traffic.rate:g}/s, {stats.answered} answered, "
        f"client errors {stats.errors}",
    ]
    if ms:
        p50, p99 = percentile(ms, 0.5), percentile(ms, 0.99)
        lines.append(
            f"  latency         p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {ms[-1]:.0f} ms "
            "(each through three sidecar hops and two apps)"
        )
    shown = ", ".join(f"{n} {traffic.by_catalog[n]}" for n in CATALOGS)
    lines.append(f"  answered by     {shown}")
    lines += [f"  client error    status {e.status} {e.error}" for e in traffic.failed[:5]]
    for o in outages:
        t = o.killed_at - traffic.started_at
        lines.append(f"  kill -9         {o.name} (app and sidecar) at {t:.1f} s")
        if o.out_at is not None:
            cut = [r for r in traffic.retried if r.started + r.seconds >= o.killed_at]
            cut = [r for r in cut if o.restarted_at is None or r.started < o.restarted_at]
            last = max((r.started - o.killed_at for r in cut), default=0.0)
            lines.append(
                f"  fail-over       {(o.out_at - o.killed_at) * 1000:.0f} ms: until the frontend's "
                f"sidecar dropped {o.name} from its table (v{o.table_before} -> "
                f"v{o.table_after})"
            )
            lines.append(
                f"  retried         {len(cut)} requests on another instance (the last started "
                f"{last * 1000:.0f} ms after the kill)"
                if cut
                else "  retried         no request needed a retry"
            )
        if o.restarted_at is not None and o.back_at is not None:
            since = traffic.by_catalog[o.name] - o.answered_before_restart
            t = o.restarted_at - traffic.started_at
            lines.append(
                f"  restart         {o.name} at {t:.1f} s: back in the table after "
                f"{o.back_at - o.restarted_at:.1f} s, answered {since} requests since"
            )
            lines.append(f"  slow start      {_ramp(traffic, o, cycle)}")
    return lines


def _ramp(traffic: Traffic, o: Outage, cycle: float) -> str:
    """The returning instance's share of the answers, per bin from its return."""
    assert o.back_at is not None
    step = 2 if cycle >= 20 else 1
    first = int(o.back_at - traffic.started_at) + 1
    bins = traffic.by_second[first : first + int(cycle * (1 - RESTART_AT))]
    shares = []
    for i in range(0, len(bins) - step + 1, step):
        counts = sum(bins[i : i + step], start=type(bins[0])())
        total = sum(counts.values())
        shares.append(f"{counts[o.name] / total:.0%}" if total else "-")
    even = 1 / len(CATALOGS)
    return f"{o.name}'s share per {step} s from its return: {' '.join(shares)} (even: {even:.0%})"


async def _demo(args: argparse.Namespace, tty: bool) -> None:
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
        _say(f"meshlet demo: starting a control plane and four sample apps with sidecars in {root}")
        try:
            timeout = aiohttp.ClientTimeout(total=5)
            async with aiohttp.ClientSession(timeout=timeout) as http:
                inbound = await _until(stop, _start(mesh, args.port, plan, http))
                repeat = duration is None or duration > plan.cycle
                _say(*_intro(mesh, inbound, plan, repeat, args.keep))
                when = f" (or it ends by itself after {duration:g} s)" if duration else ""
                _say(f"Ctrl-C stops the demo{when}.", "")
                await _run(mesh, http, inbound, plan, duration, stop, tty)
        except Stopped:
            _say("meshlet demo: stopped before it had started")
        finally:
            await mesh.close()
    _say("meshlet demo: stopped")


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

    scenario = Scenario(mesh, traffic, http, plan, event)
    footer = "Ctrl-C stops the demo" + (f"; it ends at {duration:g} s" if duration else "")

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - traffic.started_at
            snap = await view.observe(http, mesh, traffic, elapsed, plan.slow_start_s)
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
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(duration):
                await stop.wait()
        for task in helpers:
            task.cancel()
        traffic.stop()
        await driving
    elapsed = time.monotonic() - traffic.started_at
    _say(*_summary(traffic, scenario.outages, elapsed, plan.cycle))


def _say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="meshlet demo", description=__doc__)
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
        choices=["round_robin", "random", "least_request", "peak_ewma"],
        default=LB,
        help=f"how the frontend's sidecar balances over catalog (default {LB})",
    )
    parser.add_argument("--port", type=int, default=0, help="control plane port (default: free)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs, store)")
    args = parser.parse_args(argv)
    if args.duration is not None and args.duration <= 0:
        parser.error("--duration must be more than 0")
    if not 0 < args.rate <= 1000:
        parser.error("--rate must be more than 0 and at most 1000")
    tty = sys.stdout.isatty() and not args.no_tty
    failures: list[BaseException] = []
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_demo(args, tty))
    except* (RuntimeError, OSError, aiohttp.ClientError) as group:
        failures.extend(group.exceptions)
    for e in failures:
        print(f"meshlet demo: error: {e}", file=sys.stderr)
    return 1 if failures else 0
