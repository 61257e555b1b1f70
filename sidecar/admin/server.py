"""The sidecar's admin port (aiohttp; not the hot path): health, readiness, metrics, config,
endpoint statistics, drain; and the metrics port, which serves only metrics and the probes.

Mutating calls on the admin port pass ``admin_access.refusal`` first (loopback or the admin
token, same origin, JSON bodies).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import hdrs, web

from sidecar.admin.access import CHALLENGE, MUTATING, AdminCall, refusal
from sidecar.admin.exposition import CONTENT_TYPE

if TYPE_CHECKING:
    from sidecar.admin.view import SidecarView

SIDECAR: web.AppKey[SidecarView] = web.AppKey("sidecar")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
log = logging.getLogger("meshlet.admin")


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status)


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready, why = request.app[SIDECAR].readiness()
    return _json(
        {"status": "ready" if ready else "not ready", "reason": why}, 200 if ready else 503
    )


async def config_dump(request: web.Request) -> web.Response:
    return _json(request.app[SIDECAR].config_dump())


async def clusters(request: web.Request) -> web.Response:
    data = request.app[SIDECAR].endpoint_stats()
    form = request.query.get("format", "json")
    if form == "text":
        return web.Response(text=clusters_text(data))
    if form != "json":
        return _json({"error": f"format must be json or text, got {form!r}"}, 400)
    return _json(data)


COLUMNS = ("endpoint", "state", "out_for_s", "in_flight", "rtt_ms", "penalty_ms", "weight", "ramp")


def clusters_text(data: dict[str, Any]) -> str:
    """``/clusters?format=text``: a line of counters and a table of endpoints per service."""
    out: list[str] = []
    for name, service in data["services"].items():
        c = service["counters"]
        out.append(
            f"{name}: {c.get('in_flight', 0)} in flight, {c.get('retries', 0)} retries "
            f"({c.get('retries_unsent', 0)} unsent, {c.get('retries_suppressed', 0)} over "
            f"budget), {c.get('ejections', 0)} "
            f"ejections, {c.get('panics', 0)} panics, {c.get('overloaded', 0)} overloaded"
        )
        rows = [COLUMNS]
        for e in service["endpoints"]:
            out_for = e.get("excluded_for_s")
            ramp = e.get("slow_start")
            rows.append(
                (
                    f"{e['address']}:{e['port']}",
                    e["state"],
                    "probe" if out_for is None and e["state"] == "probing" else f"{out_for or 0:g}",
                    str(e.get("in_flight", 0)),
                    f"{e.get('rtt_ms', 0):.2f}",
                    f"{e.get('penalty_ms', 0):.0f}",
                    str(e["weight"]),
                    "-" if ramp is None else f"{ramp:.2f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
        out += [
            "  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
    return "\n".join(out) + "\n" if out else "no routing table loaded\n"


async def metrics(request: web.Request) -> web.Response:
    metrics = request.app[SIDECAR].metrics
    if metrics is None:
        return _json({"error": "metrics are off (--metrics off)"}, 404)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def drain(request: web.Request) -> web.Response:
    request.app[SIDECAR].drain()
    return _json({"status": "draining"}, 202)


async def not_found(request: web.Request) -> web.Response:
    return _json({"error": f"not found: {request.method} {request.path}"}, 404)


def admin_call(request: web.Request, body: bytes) -> AdminCall:
    """What ``admin_access.refusal`` reads: the TCP peer and the headers as sent."""
    peer = request.transport.get_extra_info("peername") if request.transport else None
    headers = request.headers
    return AdminCall(
        method=request.method,
        peer=peer[0] if isinstance(peer, tuple) else None,
        host=headers.get(hdrs.HOST),
        origin=headers.get(hdrs.ORIGIN),
        fetch_site=headers.get("Sec-Fetch-Site"),
        content_type=headers.get(hdrs.CONTENT_TYPE),
        authorization=headers.get(hdrs.AUTHORIZATION),
        body=body,
    )


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Mutating calls only when ``admin_access.refusal`` finds nothing wrong."""
    if request.method not in MUTATING:
        return await handler(request)
    call = admin_call(request, await request.read())
    refused = refusal(call, request.app[SIDECAR].config.admin_token)
    if refused is None:
        return await handler(request)
    log.warning(
        "admin %s %s from %s refused: %s", request.method, request.path, call.peer, refused.error
    )
    challenge = {hdrs.WWW_AUTHENTICATE: CHALLENGE} if refused.status == 401 else None
    return web.json_response({"error": refused.error}, status=refused.status, headers=challenge)


def build_admin_app(sidecar: SidecarView) -> web.Application:
    app = web.Application(middlewares=[guard])
    app[SIDECAR] = sidecar
    app.router.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/config_dump", config_dump),
            web.get("/clusters", clusters),
            web.get("/metrics", metrics),
            web.post("/drain", drain),
        ]
    )
    return app


def build_metrics_app(sidecar: SidecarView) -> web.Application:
    """``--metrics-listen``: what Prometheus and the kubelet need, and nothing that changes
    the sidecar or shows its configuration; every other request is a JSON 404."""
    app = web.Application()
    app[SIDECAR] = sidecar
    app.router.add_routes(
        [
            web.get("/metrics", metrics),
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.route("*", "/{tail:.*}", not_found),
        ]
    )
    return app
