"""The access log: a JSON line per request, written off the event loop."""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tests.sidecar.conftest import Mesh, Upstream, each, get, request, svc

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]
TRACE = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def read(path: Path) -> str:
    return path.read_text() if path.exists() else ""


async def lines(path: Path, n: int) -> list[dict[str, Any]]:
    for _ in range(50):
        text = read(path)
        if text.count("\n") >= n:
            return [json.loads(line) for line in text.splitlines()]
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} lines in {path}: {text!r}")


async def test_each_request_is_a_json_line(
    upstreams: Upstreams, make_mesh: MakeMesh, tmp_path: Path
) -> None:
    busy, ok = await upstreams("busy"), await upstreams("ok")
    log = tmp_path / "access.log"
    mesh = await make_mesh(svc(busy, ok), access_log=str(log))
    extra = f"traceparent: {TRACE}\r\nx-request-id: req-1\r\n"
    (traced,) = await request(mesh.outbound, get("/behave?x=1", extra=extra))
    (missing,) = await request(mesh.outbound, get("/", "nowhere"))
    (broken,) = await request(
        mesh.outbound, b"GET / HTTP/1.1\r\nHost: svc\r\nContent-Length: x\r\n\r\n"
    )
    assert (traced.status, missing.status, broken.status) == (200, 404, 400)
    first, second, third = await lines(log, 3)

    assert first["time"].endswith("Z")
    assert {k: first[k] for k in first if k not in ("time", "duration_ms", "upstream")} == {
        "direction": "outbound",
        "service": "svc",
        "request_id": "req-1",
        "traceparent": TRACE,
        "method": "GET",
        "authority": "svc",
        "path": "/behave?x=1",
        "status": 200,
        "attempts": first["attempts"],
        "error": None,
        "grpc_status": None,  # (a gRPC call's code: test_grpc)
    }
    # round robin: the busy endpoint first (a 503, retried) or the good one at once
    assert first["attempts"] in (1, 2)
    assert first["upstream"] == f"127.0.0.1:{ok.port}"
    assert first["duration_ms"] > 0
    assert (second["status"], second["error"], second["service"]) == (404, "no-route", "")
    assert second["upstream"] is None
    assert second["request_id"] is None  # it never went upstream, so none was made
    assert (third["status"], third["error"], third["method"]) == (400, "bad-request", None)


async def test_inbound_lines_name_the_sidecars_own_service(
    upstreams: Upstreams, make_mesh: MakeMesh, tmp_path: Path
) -> None:
    app = await upstreams("app")
    log = tmp_path / "access.log"
    mesh = await make_mesh(svc(app), app_port=app.port, access_log=str(log))
    (resp,) = await request(mesh.inbound, get("/behave", "tester"))
    assert resp.status == 200
    (line,) = await lines(log, 1)
    assert (line["direction"], line["service"], line["status"]) == ("inbound", "tester", 200)
    assert line["request_id"]  # made by the sidecar, as it sent the request on


async def test_a_log_nobody_reads_does_not_stall_requests(
    upstreams: Upstreams, make_mesh: MakeMesh, tmp_path: Path
) -> None:
    """A pipe whose reader stops: its 64 KiB buffer fills and the writer thread blocks; the
    sidecar goes on answering. Once the reader drains it, every line arrives."""
    ok = await upstreams("ok")
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    mesh = await make_mesh(svc(ok), access_log=str(fifo))
    n = 600  # about 300 bytes a line: well over the pipe's buffer
    responses = await asyncio.wait_for(each(mesh, get("/behave"), n), 30)
    assert [r.status for r in responses] == [200] * n
    got = bytearray()
    done = threading.Event()

    def drain() -> None:
        os.set_blocking(reader, True)
        while got.count(b"\n") < n:
            chunk = os.read(reader, 65536)
            if not chunk:
                break
            got.extend(chunk)
        done.set()

    threading.Thread(target=drain, daemon=True).start()
    assert await asyncio.to_thread(done.wait, 10)
    assert got.count(b"\n") == n
    assert mesh.sidecar.access_log is not None
    assert mesh.sidecar.access_log.dropped == 0
    os.close(reader)
