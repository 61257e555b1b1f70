"""The sidecar's admin port (aiohttp; not the hot path): health, readiness, config, endpoint
statistics, drain."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from sidecar.app import Sidecar

SIDECAR: web.AppKey[Sidecar] = web.AppKey("sidecar")


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
    return _json(request.app[SIDECAR].endpoint_stats())


async def drain(request: web.Request) -> web.Response:
    request.app[SIDECAR].drain()
    return _json({"status": "draining"}, 202)


def build_admin_app(sidecar: Sidecar) -> web.Application:
    app = web.Application()
    app[SIDECAR] = sidecar
    app.router.add_routes(
        [
            web.get("/healthz", healthz),
            web.get("/readyz", readyz),
            web.get("/config_dump", config_dump),
            web.get("/clusters", clusters),
            web.post("/drain", drain),
        ]
    )
    return app
