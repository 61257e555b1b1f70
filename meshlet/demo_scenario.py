"""The demo's script: every cycle one catalog instance dies and comes back, and how the mesh
took it is measured from outside, as an operator would: the frontend sidecar's admin port
(which endpoints its table holds, which it has ejected) and the client's own answers.

Odd cycles kill a whole instance, app and sidecar (a pod or VM dies): its stream to the control
plane closes, the control plane marks it unhealthy at once and pushes a table without it.
Even cycles kill only the app (it crashes; its sidecar stays up and answers 502 for it): the
frontend's sidecar retries those tries elsewhere and ejects the endpoint after five failures in
a row, and the catalog sidecar's health checks take it out of the table a few seconds later.
Either way no client sees an error. Then it starts again, and slow start ramps its share.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from meshlet.demo_mesh import Mesh
from meshlet.demo_traffic import Reply, Traffic
from meshlet.demo_view import get_json

CATALOGS = ("catalog-1", "catalog-2", "catalog-3")
VICTIMS = ("catalog-2", "catalog-3", "catalog-1")
"""one per cycle, in this order"""
KILL_AT, RESTART_AT, SLOW_START = 0.25, 0.55, 0.3
"""fractions of a cycle: when the kill comes, when the restart, how long the slow start"""
POLL = 0.02
"""seconds between looks at the frontend's sidecar while something changes"""


@dataclass
class Outage:
    """One kill and what followed; times are monotonic seconds."""

    name: str
    app_only: bool
    killed_at: float
    pids: list[int]
    table_before: int | None
    avoided_at: float | None = None
    """when the frontend's sidecar stopped sending it requests (ejected, or out of its table)"""
    out_at: float | None = None
    """when it was out of the frontend sidecar's table"""
    table_after: int | None = None
    restarted_at: float | None = None
    back_at: float | None = None
    """when it was back in the frontend sidecar's table"""
    table_back: int | None = None
    answered_before_restart: int = 0

    def retried(self, traffic: Traffic) -> list[Reply]:
        """Requests answered after a retry between the kill and the restart."""
        until = self.restarted_at or float("inf")
        return [
            r
            for r in traffic.retried
            if r.started + r.seconds >= self.killed_at and r.started < until
        ]


class Scenario:
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
        self.slow_start_s = round(cycle * SLOW_START, 1)
        self.event = event
        self.outages: list[Outage] = []

    def __repr__(self) -> str:
        return f"<Scenario [every {self.cycle:g} s, {len(self.outages)} outages so far]>"

    async def run(self) -> None:
        for k, name in enumerate(itertools.cycle(VICTIMS)):
            start = self.traffic.started_at + k * self.cycle
            await _sleep_until(start + KILL_AT * self.cycle)
            outage = await self.kill(name, app_only=k % 2 == 1)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(_loop_time(start + RESTART_AT * self.cycle)):
                    await self.watch_fail_over(outage)
            await _sleep_until(start + RESTART_AT * self.cycle)
            await self.restart(outage)

    async def kill(self, name: str, *, app_only: bool) -> Outage:
        version, _ = await self._frontend_view()
        pids = await self.mesh.kill(name, app_only=app_only)
        outage = Outage(name, app_only, time.monotonic(), pids, version)
        self.outages.append(outage)
        if app_only:
            self.event(f"kill -9 {name}'s app ({_pids(pids)}); its sidecar stays up")
        else:
            self.event(f"kill -9 {name}, app and sidecar ({_pids(pids)})")
        return outage

    async def watch_fail_over(self, o: Outage) -> None:
        """Until the frontend's sidecar has it out of its table, noting when it stopped
        sending it requests."""
        port = self.mesh.instances[o.name].ports["inbound"]
        while o.out_at is None:
            await asyncio.sleep(POLL)
            version, endpoints = await self._frontend_view()
            now = time.monotonic()
            state = endpoints.get(port, "out")
            if state != "healthy" and o.avoided_at is None:
                o.avoided_at = now
                if state != "out":
                    self.event(
                        f"{o.name} {state} by the frontend's sidecar {_ms(now - o.killed_at)} "
                        "after the kill, its failed tries retried elsewhere"
                    )
            if state == "out":
                o.out_at, o.table_after = now, version
                why = "its sidecar's health checks failed" if o.app_only else "its stream closed"
                self.event(
                    f"{o.name} out of the table (v{version}) {_ms(now - o.killed_at)} after "
                    f"the kill: {why}"
                )

    async def restart(self, o: Outage) -> None:
        o.answered_before_restart = self.traffic.by_catalog[o.name]
        o.restarted_at = time.monotonic()
        what = f"{o.name}'s app (on its old port)" if o.app_only else f"{o.name} (on its old port)"
        self.event(f"restart {what}")
        instance = await self.mesh.restart(o.name)
        port = instance.ports["inbound"]
        while o.back_at is None:
            version, endpoints = await self._frontend_view()
            if endpoints.get(port) == "healthy":
                o.back_at, o.table_back = time.monotonic(), version
            else:
                await asyncio.sleep(POLL)
        pids = [instance.app.pid] if o.app_only else [instance.app.pid, instance.sidecar.pid]
        self.event(
            f"{o.name} back in the table (v{o.table_back}) {o.back_at - o.restarted_at:.1f} s "
            f"after the restart; slow start over {self.slow_start_s:g} s ({_pids(pids)})"
        )

    async def _frontend_view(self) -> tuple[int | None, dict[int, str]]:
        """The frontend sidecar's table version, and the state of each catalog endpoint in it
        by port (``healthy``, ``ejected``, ...)."""
        admin = self.mesh.instances["frontend-1"].admin_url
        dump, clusters = await asyncio.gather(
            get_json(self.http, f"{admin}/config_dump"), get_json(self.http, f"{admin}/clusters")
        )
        version = ((dump or {}).get("table") or {}).get("version")
        catalog = (clusters or {}).get("services", {}).get("catalog", {})
        return version, {e["port"]: str(e["state"]) for e in catalog.get("endpoints", [])}


def summary(traffic: Traffic, outages: list[Outage], cycle: float) -> list[str]:
    """The lines on each outage: the kill, the fail-over, the retries, the return."""
    lines = []
    for o in outages:
        at = o.killed_at - traffic.started_at
        if o.app_only:
            lines.append(f"  kill -9         {o.name}'s app at {at:.1f} s (its sidecar stays up)")
        else:
            lines.append(f"  kill -9         {o.name}, app and sidecar, at {at:.1f} s")
        if o.avoided_at is not None:
            dropped = f"from its table (v{o.table_before} -> v{o.table_after})"
            if o.out_at is None or o.avoided_at < o.out_at:
                how = f"ejected {o.name}" + (
                    f"; it dropped it {dropped} after {o.out_at - o.killed_at:.1f} s"
                    if o.out_at
                    else ""
                )
            else:
                how = f"dropped {o.name} {dropped}"
            lines.append(
                f"  fail-over       {(o.avoided_at - o.killed_at) * 1000:.0f} ms: until the "
                f"frontend's sidecar {how}"
            )
        cut = o.retried(traffic)
        last = max((r.started - o.killed_at for r in cut), default=0.0)
        lines.append(
            f"  retried         {_n(len(cut), 'request')} on another instance (the last "
            f"started {_ms(last)} after the kill)"
            if cut
            else "  retried         no request needed a retry"
        )
        if o.restarted_at is not None and o.back_at is not None:
            since = traffic.by_catalog[o.name] - o.answered_before_restart
            at = o.restarted_at - traffic.started_at
            lines.append(
                f"  restart         {o.name} at {at:.1f} s: back in the table after "
                f"{o.back_at - o.restarted_at:.1f} s, answered {since} requests since"
            )
            lines.append(f"  slow start      {_ramp(traffic, o, cycle)}")
    return lines


def _ramp(traffic: Traffic, o: Outage, cycle: float) -> str:
    """The returning instance's share of the answers, per 2 s (1 s in short runs) from its
    return to the end of its cycle."""
    assert o.back_at is not None
    step = 2 if cycle >= 20 else 1
    first = int(o.back_at - traffic.started_at) + 1
    bins = traffic.by_second[first : first + int(cycle * (1 - RESTART_AT))]
    shares = []
    for i in range(0, len(bins) - step + 1, step):
        counts: collections.Counter[str] = sum(bins[i : i + step], collections.Counter())
        total = counts.total()
        shares.append(f"{counts[o.name] / total:.0%}" if total else "-")
    if not shares:
        return f"{o.name}'s share: the run ended too soon after its return to show it"
    even = 1 / len(CATALOGS)
    return f"{o.name}'s share per {step} s from its return: {' '.join(shares)} (even: {even:.0%})"


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 2 else f"{seconds:.1f} s"


def _pids(pids: list[int]) -> str:
    return f"pid {pids[0]}" if len(pids) == 1 else "pids " + " and ".join(map(str, pids))


def _n(count: int, thing: str) -> str:
    return f"{count} {thing}{'' if count == 1 else 's'}"


def _loop_time(when: float) -> float:
    """``time.monotonic`` ``when`` on the running loop's clock."""
    loop = asyncio.get_running_loop()
    return loop.time() + (when - time.monotonic())


async def _sleep_until(when: float) -> None:
    await asyncio.sleep(max(0.0, when - time.monotonic()))
