"""A backend process for fault tests: ``python -m tests.backend --name N [--port P]
[--outbound PORT]``. Prints ``listening on PORT``.

    GET /whoami          200 and the name; 503 while failing (SIGUSR1 toggles failing)
    GET /healthz         the same status as /whoami (for HAProxy's checks)
    GET /sleep?ms=N      answers after N ms
    GET /chain?to=SVC    calls SVC through the sidecar at --outbound, forwarding the
                         x-meshlet-* headers as an app forwards trace headers; answers with
                         that status, and a body naming who answered what
    GET /hits            how many /whoami and /chain requests it has had (never fails)
    POST /consume        reads the body, answers its size
    GET /events?count=N&every_ms=M&silent_ms=S
                         server-sent events: N events M ms apart, then S ms of silence
    GET /ws              a WebSocket that echoes every message
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import aiohttp
from aiohttp import web

STATE = web.AppKey("state", dict)


async def whoami(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state["hits"] += 1
    if state["failing"]:
        return web.Response(status=503, text=f"{state['name']} failing")
    return web.Response(text=state["name"])


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(status=503 if state["failing"] else 200, text="health")


async def sleep(request: web.Request) -> web.Response:
    await asyncio.sleep(int(request.query.get("ms", "0")) / 1000)
    return web.Response(text="slept")


async def chain(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state["hits"] += 1
    if state["failing"]:
        return web.Response(status=503, text=f"{state['name']} failing")
    forwarded = {k: v for k, v in request.headers.items() if k.lower().startswith("x-meshlet-")}
    url = f"http://127.0.0.1:{state['outbound']}/{request.query.get('path', 'whoami')}"
    headers = {"Host": request.query["to"], **forwarded}
    async with state["http"].get(url, headers=headers) as r:
        body = await r.text()
        error = r.headers.get("x-meshlet-error", "")
    text = f"{state['name']} got {r.status} {error}: {body.strip()}"
    return web.Response(status=r.status, text=text)


async def hits(request: web.Request) -> web.Response:
    return web.json_response({"hits": request.app[STATE]["hits"]})


async def consume(request: web.Request) -> web.Response:
    total = 0
    async for chunk in request.content.iter_any():
        total += len(chunk)
    return web.json_response({"received": total})


async def events(request: web.Request) -> web.StreamResponse:
    count = int(request.query.get("count", "10"))
    every = int(request.query.get("every_ms", "100")) / 1000
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    for i in range(count):
        await resp.write(b"data: %d\n\n" % i)
        await asyncio.sleep(every)
    await asyncio.sleep(int(request.query.get("silent_ms", "0")) / 1000)
    await resp.write_eof()
    return resp


async def websocket(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    async for msg in ws:
        await ws.send_str(f"echo: {msg.data}")
    return ws


async def main(args: argparse.Namespace) -> None:
    app = web.Application()
    state = {"name": args.name, "failing": False, "hits": 0, "outbound": args.outbound}
    app[STATE] = state
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/sleep", sleep)
    app.router.add_get("/chain", chain)
    app.router.add_get("/hits", hits)
    app.router.add_post("/consume", consume)
    app.router.add_get("/events", events)
    app.router.add_get("/ws", websocket)
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: state.update(failing=not state["failing"]))
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    async with aiohttp.ClientSession() as http:
        state["http"] = http
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        print(f"listening on {runner.addresses[0][1]}", flush=True)
        await stop.wait()
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--outbound", type=int, default=0)
    asyncio.run(main(parser.parse_args()))
