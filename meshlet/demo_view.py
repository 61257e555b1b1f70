"""What the demo shows each second: per catalog instance its process, what the control plane
says of it, what the frontend's sidecar does with it, and the traffic it answers; with
``--ha``, per control-plane replica whether it runs, reaps and is ready, and whose streams it
holds.

``observe`` asks the mesh (the frontend sidecar's ``/clusters`` and ``/config_dump``, the
control plane's instance list; each replica's ``/metrics`` and ``/readyz`` and each sidecar's
``/config_dump``); ``frame`` draws it for a terminal (``Screen`` redraws in
place), ``status_line`` as one line for logs and CI.
"""

from __future__ import annotations

import asyncio
import math
import shutil
import sys
from dataclasses import dataclass
from typing import Any

import aiohttp

from meshlet.demo_ha import ReplicaState, replica_states
from meshlet.demo_mesh import Mesh
from meshlet.demo_traffic import Traffic, percentile

RATE_WINDOW = 1.0
"""seconds over which the live request rates are counted"""
LATENCY_WINDOW = 5.0
"""seconds over which the live p50 and p99 are taken"""
BAR = 24
"""characters of the bar that would stand for all of the traffic"""
EIGHTHS = " ▏▎▍▌▋▊▉█"


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    process: str
    """``up``, ``killed`` or ``starting``"""
    registry: str
    """the control plane's status of the instance: healthy, unhealthy, draining, or ``-``"""
    routing: str
    """what the frontend's sidecar does with it: ``routing``, ``out of table``, ``ejected``,
    ``slow start 40%``, ..."""
    rate: float
    """requests per second it answered, over ``RATE_WINDOW``"""
    share: float
    """of all answers over ``RATE_WINDOW``, 0-1"""
    p50_ms: float
    p99_ms: float


@dataclass(frozen=True, slots=True)
class Snapshot:
    elapsed: float
    rate: float
    sent: int
    errors: int
    retries: int
    """the frontend's sidecar's retries to catalog"""
    ejections: int
    table_version: int | None
    """of the table in force at the frontend's sidecar"""
    control_plane_version: int | None
    rows: list[Row]
    replicas: list[ReplicaState]
    """(``--ha``) each control-plane replica; empty with one control plane"""


async def get_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> Any:
    """The JSON at ``url``, or None (not 200, unreachable, slow or not JSON)."""
    try:
        async with http.get(url, headers=headers) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def observe(
    http: aiohttp.ClientSession,
    mesh: Mesh,
    traffic: Traffic,
    elapsed: float,
) -> Snapshot:
    frontend = mesh.instances["frontend-1"]
    clusters, dump, listed, table, replicas = await asyncio.gather(
        get_json(http, f"{frontend.admin_url}/clusters"),
        get_json(http, f"{frontend.admin_url}/config_dump"),
        get_json(http, f"{mesh.url}/v1/services/catalog/instances", mesh.auth),
        get_json(http, f"{mesh.url}/v1/table", mesh.auth),
        replica_states(http, mesh) if mesh.ha else _no_replicas(),
    )
    catalog = (clusters or {}).get("services", {}).get("catalog", {})
    endpoints = {e["port"]: e for e in catalog.get("endpoints", [])}
    statuses = {i["port"]: i["status"] for i in (listed or {}).get("instances", [])}
    counters = catalog.get("counters", {})
    recent = traffic.window(RATE_WINDOW)
    seconds = min(RATE_WINDOW, max(elapsed, 0.5))
    rows = []
    for name, instance in sorted(mesh.instances.items()):
        if instance.service != "catalog":
            continue
        port = instance.ports["inbound"]
        answered = [r for r in recent if r.catalog == name]
        latencies = [r.seconds * 1000 for r in traffic.window(LATENCY_WINDOW) if r.catalog == name]
        rows.append(
            Row(
                name=name,
                process="up" if instance.alive else "killed",
                registry=statuses.get(port, "-"),
                routing=_routing(endpoints.get(port)),
                rate=len(answered) / seconds,
                share=len(answered) / len(recent) if recent else 0.0,
                p50_ms=percentile(latencies, 0.5),
                p99_ms=percentile(latencies, 0.99),
            )
        )
    stats = traffic.statistics()
    return Snapshot(
        elapsed=elapsed,
        rate=traffic.rate,
        sent=stats.sent,
        errors=stats.errors,
        retries=int(counters.get("retries", 0)),
        ejections=int(counters.get("ejections", 0)),
        table_version=((dump or {}).get("table") or {}).get("version"),
        control_plane_version=(table or {}).get("version"),
        rows=rows,
        replicas=replicas,
    )


async def _no_replicas() -> list[ReplicaState]:
    return []


def _routing(endpoint: dict[str, Any] | None) -> str:
    """What the frontend's sidecar does with an endpoint, in a few words (its /clusters
    state: draining, ejected, ...; its slow-start share; its failure penalty)."""
    if endpoint is None:
        return "out of table"
    if endpoint["state"] != "healthy":
        return str(endpoint["state"])
    ramp = endpoint["slow_start"]
    if ramp is not None and ramp < 1.0:
        return f"slow start {math.floor(ramp * 100)}%"
    if float(endpoint.get("penalty_ms", 0.0)) >= 100:
        return f"penalised {endpoint['penalty_ms'] / 1000:.1f} s"
    return "routing"


def _ms(value: float, rate: float) -> str:
    return "-" if math.isnan(value) or not rate else f"{value:.1f}"


def _bar(share: float) -> str:
    eighths = round(share * BAR * 8)
    full, part = divmod(eighths, 8)
    return ("█" * full + (EIGHTHS[part] if part else "")).ljust(BAR)


def headline(s: Snapshot) -> str:
    version = "-" if s.table_version is None else f"v{s.table_version}"
    return (
        f"{s.elapsed:5.1f} s  requests {s.sent:<5d} client errors {s.errors}  "
        f"retries {s.retries}  ejections {s.ejections}  table {version}"
    )


def frame(s: Snapshot, events: list[str], footer: str) -> list[str]:
    """The live view: a headline, a row per catalog instance, the latest events."""
    head = ["instance", "process", "control plane", "frontend's sidecar", "req/s", "share"]
    lines = [
        "meshlet demo   " + headline(s),
        "",
        f"  {head[0]:<10} {head[1]:<8} {head[2]:<14} {head[3]:<19} {head[4]:>5}  "
        f"{head[5]:<{BAR + 5}} p50 ms  p99 ms",
    ]
    lines += [
        f"  {r.name:<10} {r.process:<8} {r.registry:<14} {r.routing:<19} {r.rate:5.1f}  "
        f"{_bar(r.share)}{r.share:4.0%}  {_ms(r.p50_ms, r.rate):>6}  {_ms(r.p99_ms, r.rate):>6}"
        for r in s.rows
    ]
    if s.replicas:
        lines += ["", f"  {'replica':<10} {'process':<8} {'role':<9} {'ready':<6} streams on it"]
        lines += [
            f"  {r.name:<10} {r.process:<8} {_part(r):<9} {_ready(r):<6} "
            + (", ".join(r.streams) or "-")
            for r in s.replicas
        ]
    lines += [
        "",
        "  control plane: the instance's status in the registry; frontend's sidecar: what that "
        "sidecar's",
        "  balancer does with it (the table: its routing table); req/s, share: answers over the "
        f"last {RATE_WINDOW:g} s;",
        f"  p50, p99: the demo client's latency over the last {LATENCY_WINDOW:g} s",
        *(
            [
                "  replica: a control-plane process on the shared Redis (the one that reaps "
                "holds the lease);",
                "  streams on it: the instances whose sidecars' push streams it serves",
            ]
            if s.replicas
            else []
        ),
        "",
        *(events[-8:] or ["  (events appear here)"]),
        "",
        footer,
    ]
    return lines


def status_line(s: Snapshot) -> str:
    """``headline | catalog-1 17/s p50 9 p99 15 ms | catalog-2 0/s (killed, ...) | ...``"""
    parts = [headline(s)]
    for r in s.rows:
        state = ", ".join(
            x for x in (r.process, r.registry, r.routing) if x not in ("up", "healthy", "routing")
        )
        shown = f"{r.name} {r.rate:2.0f}/s"
        if r.rate and not math.isnan(r.p50_ms):
            shown += f" p50 {r.p50_ms:2.0f} p99 {r.p99_ms:2.0f} ms"
        parts.append(shown + (f" ({state})" if state else ""))
    for replica in s.replicas:
        held = f" <- {' '.join(replica.streams)}" if replica.streams else ""
        parts.append(f"{replica.name} {_role(replica)}{held}")
    return " | ".join(parts)


def _part(r: ReplicaState) -> str:
    if r.process != "up":
        return "-"
    return "reaper" if r.reaper else "follower"


def _ready(r: ReplicaState) -> str:
    return "-" if r.process != "up" else "yes" if r.ready else "no"


def _role(r: ReplicaState) -> str:
    if r.process != "up":
        return r.process
    return _part(r) + ("" if r.ready else ", not ready")


class Screen:
    """Redraws a block of lines in place at the bottom of a terminal (ANSI)."""

    def __init__(self) -> None:
        self.drawn = 0

    def draw(self, lines: list[str]) -> None:
        width = shutil.get_terminal_size().columns
        out = f"\x1b[{self.drawn}F\x1b[J" if self.drawn else ""
        out += "".join(line[: width - 1] + "\n" for line in lines)
        sys.stdout.write(out)
        sys.stdout.flush()
        self.drawn = len(lines)
