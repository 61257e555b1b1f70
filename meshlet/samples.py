"""The demo's sample apps, each a tiny aiohttp server that knows nothing of meshlet beyond
"call other services through my sidecar and forward the ``x-meshlet-*`` headers":

    python -m meshlet.samples catalog --name catalog-1 [--port 0]
    python -m meshlet.samples frontend --name frontend-1 --outbound 127.0.0.1:PORT [--port 0]

Each prints ``NAME listening on http://127.0.0.1:PORT`` once it accepts connections, and stops
on SIGTERM or SIGINT.

``catalog``: ``GET /items`` answers JSON naming the instance, after 2-10 ms of "work", with
the try number its caller's sidecar gave (``x-meshlet-attempt``: 2 means a first try failed
elsewhere and this is the retry). ``frontend``: ``GET /`` calls ``catalog`` through its
sidecar's outbound listener (``Host: catalog``), forwarding the trace and ``x-meshlet-*``
headers, and answers JSON saying which catalog instance answered. ``GET /healthz`` on both.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import aiohttp
import uvloop
from aiohttp import web

NAME = web.AppKey("name", str)
CATALOG_URL = web.AppKey("catalog_url", str)
HTTP = web.AppKey("http", aiohttp.ClientSession)

ITEMS = [
    {"sku": "tea-001", "name": "Assam tea", "price": 4.5},
    {"sku": "cup-002", "name": "Enamel cup", "price": 7.0},
    {"sku": "pot-003", "name": "Cast-iron teapot", "price": 39.0},
]
WORK_MS = (2.0, 10.0)
"""milliseconds a catalog request takes, uniformly in this range"""
PASSED_ON = ("traceparent", "tracestate", "x-request-id")
"""headers an app forwards on the calls it makes for a request, besides ``x-meshlet-*``"""


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", "instance": request.app[NAME]})


async def items(request: web.Request) -> web.Response:
    await asyncio.sleep(random.uniform(*WORK_MS) / 1000)
    attempt = int(request.headers.get("x-meshlet-attempt", "1") or 1)
    return web.json_response({"instance": request.app[NAME], "attempt": attempt, "items": ITEMS})


async def front_page(request: web.Request) -> web.Response:
    """Ask catalog (through the sidecar) and say who answered; a failure is passed on."""
    forwarded = {
        k: v
        for k, v in request.headers.items()
        if k.lower().startswith("x-meshlet-") or k.lower() in PASSED_ON
    }
    headers = {**forwarded, "Host": "catalog"}
    try:
        async with request.app[HTTP].get(request.app[CATALOG_URL], headers=headers) as r:
            if r.status != 200:
                text = (await r.text()).strip()
                error = r.headers.get("x-meshlet-error", "")
                return web.json_response(
                    {
                        "frontend": request.app[NAME],
                        "catalog_status": r.status,
                        "error": error,
                        "detail": text[:200],
                    },
                    status=502 if r.status < 500 else r.status,
                )
            data = await r.json()
    except (aiohttp.ClientError, ValueError) as e:
        return web.json_response(
            {"frontend": request.app[NAME], "error": f"catalog call failed: {e!r}"}, status=502
        )
    return web.json_response(
        {
            "frontend": request.app[NAME],
            "catalog": data["instance"],
            "attempt": data["attempt"],
            "items": len(data["items"]),
        }
    )


def build(kind: str, name: str, outbound: str) -> web.Application:
    app = web.Application()
    app[NAME] = name
    app.router.add_get("/healthz", healthz)
    if kind == "catalog":
        app.router.add_get("/items", items)
    else:
        app[CATALOG_URL] = f"http://{outbound}/items"
        app.router.add_get("/", front_page)
        app.cleanup_ctx.append(_client)
    return app


async def _client(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        app[HTTP] = http
        yield


async def serve(kind: str, name: str, port: int, outbound: str) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(build(kind, name, outbound), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        host, bound = runner.addresses[0][:2]
        print(f"{name} listening on http://{host}:{bound}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshlet.samples", description=__doc__)
    parser.add_argument("kind", choices=["catalog", "frontend"])
    parser.add_argument("--name", required=True, help="instance name, shown in answers")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one)")
    parser.add_argument("--outbound", default="", help="frontend: its sidecar's outbound HOST:PORT")
    args = parser.parse_args(argv)
    if args.kind == "frontend" and not args.outbound:
        parser.error("frontend needs --outbound")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.kind, args.name, args.port, args.outbound))
    return 0


if __name__ == "__main__":
    sys.exit(main())
