"""``meshlet demo``: a control plane on SQLite in a temp dir, sample instances, live output.

Everything shown is real: the instances are registered and heartbeat through the REST API,
and the curl commands printed work against the running control plane. One instance (``batch``)
never heartbeats, so within 30 s you watch it turn unhealthy and then get removed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shlex
import signal
import socket
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

import aiohttp
import uvloop

from control_plane.app import serve
from control_plane.config import ControlPlaneConfig

HEARTBEAT_EVERY = 5.0
SAMPLES: list[tuple[str, dict[str, Any]]] = [
    ("catalog", {"id": "catalog-1", "address": "127.0.0.1", "port": 8081, "zone": "a"}),
    ("catalog", {"id": "catalog-2", "address": "127.0.0.1", "port": 8082, "zone": "a"}),
    (
        "catalog",
        {
            "id": "catalog-3",
            "address": "127.0.0.1",
            "port": 8083,
            "zone": "b",
            "weight": 50,
            "metadata": {"version": "v2"},
        },
    ),
    ("frontend", {"id": "frontend-1", "address": "127.0.0.1", "port": 8080, "zone": "a"}),
    ("batch", {"id": "batch-1", "address": "127.0.0.1", "port": 8090}),
]
CATALOG_POLICY = {"lb": "least_request", "retries": 2, "timeout_ms": 5000}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _say(*lines: str) -> None:
    print(*lines, sep="\n", flush=True)


async def _call(
    http: aiohttp.ClientSession, method: str, url: str, body: Any = None
) -> dict[str, Any]:
    async with http.request(method, url, json=body) as r:
        if r.status >= 300:
            raise RuntimeError(f"{method} {url} -> {r.status}: {await r.text()}")
        data: dict[str, Any] = await r.json()
        return data


async def _heartbeats(http: aiohttp.ClientSession, base: str) -> None:
    """Every sample instance but batch-1 heartbeats; one you deleted stays deleted."""
    gone: set[str] = set()
    while True:
        await asyncio.sleep(HEARTBEAT_EVERY)
        for service, body in SAMPLES:
            name = f"{service}/{body['id']}"
            if service == "batch" or name in gone:
                continue
            url = f"{base}/v1/services/{name.replace('/', '/instances/')}/heartbeat"
            async with http.put(url) as r:
                if r.status == 404:
                    gone.add(name)
                    _say(f"  [demo] {name} was deleted: it stops heartbeating")


async def _watch(http: aiohttp.ClientSession, base: str) -> None:
    """Print a line whenever a service's instance counts or the protection flag change."""
    last = ""
    while True:
        data = await _call(http, "GET", f"{base}/v1/services")
        parts = []
        for s in data["services"]:
            counts = s["instances"]
            shown = ", ".join(f"{n} {k}" for k, n in counts.items() if n and k != "total")
            parts.append(f"{s['name']}: {shown or 'no instances'}")
        line = " | ".join(parts) + (" | PROTECTION ON" if data["protection"] else "")
        if line != last:
            _say(f"  [live] {line}")
            last = line
        await asyncio.sleep(1.0)


async def _demo(port: int, seconds: float | None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if seconds is not None:
        loop.call_later(seconds, stop.set)

    with tempfile.TemporaryDirectory(prefix="meshlet-demo-") as tmp:
        config = ControlPlaneConfig(port=port, store=f"sqlite:///{tmp}/meshlet.db")
        base = config.url
        cp_stop = asyncio.Event()
        async with asyncio.TaskGroup() as tasks:
            control_plane = tasks.create_task(serve(config, cp_stop), name="control-plane")
            async with aiohttp.ClientSession() as http:
                await _wait_ready(http, base, control_plane)
                _say(f"meshlet demo: control plane at {base}, SQLite store in {tmp}", "")
                await _call(http, "PUT", f"{base}/v1/services/catalog/policy", CATALOG_POLICY)
                for service, body in SAMPLES:
                    await _call(http, "POST", f"{base}/v1/services/{service}/instances", body)
                _say(
                    "",
                    "Try these while the demo runs:",
                    *_examples(base),
                    "",
                    "batch-1 never heartbeats: it turns unhealthy after 15 s and is removed "
                    "after 30 s. Ctrl-C stops the demo.",
                    "",
                )
                helpers = [
                    tasks.create_task(_heartbeats(http, base), name="heartbeats"),
                    tasks.create_task(_watch(http, base), name="watch"),
                ]
                await stop.wait()
                for task in helpers:
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.gather(*helpers)
            cp_stop.set()
    _say("meshlet demo: stopped")


async def _wait_ready(http: aiohttp.ClientSession, base: str, cp: asyncio.Task[None]) -> None:
    for _ in range(100):
        if cp.done():
            cp.result()  # raises why the control plane did not start
            raise RuntimeError("control plane stopped before it was ready")
        with contextlib.suppress(aiohttp.ClientError):
            async with http.get(f"{base}/readyz") as r:
                if r.status == 200:
                    return
        await asyncio.sleep(0.1)
    raise RuntimeError("control plane did not become ready within 10 s")


def _examples(base: str) -> list[str]:
    drain = shlex.quote('{"status": "draining"}')
    return [
        f"  curl -s {base}/v1/services",
        f"  curl -s {base}/v1/services/catalog",
        f"  curl -s -X PATCH {base}/v1/services/catalog/instances/catalog-2 "
        f"-H 'Content-Type: application/json' -d {drain}",
        f"  curl -s -X PUT {base}/v1/services/catalog/instances/catalog-1/heartbeat",
        f"  curl -s {base}/openapi.json",
    ]


def main(argv: Sequence[str] = ()) -> int:
    parser = argparse.ArgumentParser(prog="meshlet demo", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="control plane port (default: free)")
    parser.add_argument("--seconds", type=float, default=None, help="stop after this long")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="  [control-plane] %(message)s")
    failures: list[BaseException] = []
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_demo(args.port or _free_port(), args.seconds))
    except* (RuntimeError, OSError, aiohttp.ClientError) as group:
        failures.extend(group.exceptions)
    for e in failures:
        print(f"meshlet demo: error: {e}", file=sys.stderr)
    return 1 if failures else 0
