"""Tries none of which was sent upstream (a refused or timed-out connect, a connection closed
before the request was written to it): no app saw them, so they are resent to another
endpoint at once, whatever the method and wherever the hop, outside ``retries``,
``max_retries`` and the backoff, within the budget and the time left. A try that was sent
keeps the retry rules: a non-idempotent request is not tried again."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from tests.processes import free_port
from tests.sidecar.conftest import (
    NO_OUTLIER,
    Mesh,
    RawUpstream,
    Response,
    Upstream,
    get,
    read_head,
    request,
    svc,
)
from tests.sidecar.test_metrics import samples, scrape, value
from tests.sidecar.test_resilience import counters

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]
RawUpstreams = Callable[..., Awaitable[RawUpstream]]

#: no retries of requests that were sent, neither per request nor at once
NO_RETRIES = {"retries": 0, "max_retries": 0, "outlier": NO_OUTLIER}


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: svc\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def at_once(mesh: Mesh, raws: list[bytes]) -> list[Response]:
    """Every request on its own connection, all at the same time."""
    replies = await asyncio.gather(*(request(mesh.outbound, raw) for raw in raws))
    return [r for (r,) in replies]


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose listen queue is full: the kernel drops every SYN, connects time out."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port: int = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    yield port
    for s in (*fillers, server):
        s.close()


async def reset_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Accept, then reset (RST) without reading a byte."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@pytest.fixture
async def closed_before_written(
    raw_upstream: RawUpstreams, monkeypatch: pytest.MonkeyPatch
) -> RawUpstream:
    """An upstream that resets every connection as it accepts it, and a sidecar whose event
    loop hands new connections to it over only 50 ms after they open: by then the reset has
    closed them, so no byte of a request is ever written to one (on a real network the
    sidecar usually writes first, and the try counts as sent). The loop's method is what is
    replaced, not the pool's: compiled with mypyc, the pool's callers do not look it up."""
    dead = await raw_upstream(reset_at_once)
    loop = asyncio.get_running_loop()
    create_connection = loop.create_connection

    async def late(*args: Any, **options: Any) -> tuple[asyncio.BaseTransport, Any]:
        made = await create_connection(*args, **options)  # (factory, host, port)
        if args[2:] == (dead.port,):
            await asyncio.sleep(0.05)
        return made

    monkeypatch.setattr(loop, "create_connection", late)
    return dead


@pytest.mark.parametrize("lb", ["round_robin", "least_request", "peak_ewma", "random"])
async def test_refused_endpoints_among_live_ones_fail_no_request(
    lb: str, upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    """Two endpoints nobody listens on, two live ones; no retries of sent requests at all,
    32 callers at once: every GET and POST (with its body), and every call an earlier hop
    made (which is not retried again here), is answered by a live endpoint, as the first
    try its app sees."""
    ok = [await upstreams(f"ok{i}") for i in range(2)]
    dead = [free_port(), free_port()]
    mesh = await make_mesh(svc(dead[0], ok[0], dead[1], ok[1], lb=lb, **NO_RETRIES))
    body = b"x" * 100_000  # larger than what is kept for a replay: nothing is replayed
    raws = [
        get("/behave"),
        post("/echo", body),
        get("/behave", extra="x-meshlet-attempt: 1\r\n"),
        post("/echo", b"hi", "x-meshlet-attempt: 1\r\n"),
    ]
    replies = []
    for _ in range(3):
        replies += await at_once(mesh, raws * 8)
    assert [r.status for r in replies] == [200] * 96
    for raw, r in zip(raws * 24, replies, strict=True):
        answer = json.loads(r.body)
        assert answer["server"] in ("ok0", "ok1")
        if raw.startswith(b"POST"):
            assert answer["body_length"] == len(raw.partition(b"\r\n\r\n")[2])
        elif b"x-meshlet-attempt" not in raw:
            assert answer["mesh"]["x-meshlet-attempt"] == "1"  # never sent: not a retry
    c = (await counters(mesh))["counters"]
    assert c["retries_unsent"] >= 1
    assert c["retries"] == c["retries_unsent"]  # nothing else was retried
    assert (c["retries_over_limit"], c["retries_suppressed"]) == (0, 0)
    assert (c["in_flight"], c["pending"], c["retrying"]) == (0, 0, 0)


async def test_a_connect_timeout_is_resent_at_once_within_the_time_left(
    blackhole: int, upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ok = await upstreams("ok")
    policy = {"connect_timeout_ms": 100, **NO_RETRIES}
    mesh = await make_mesh(
        {
            **svc(blackhole, ok, **policy),
            # the connect timeout leaves 5 ms, less than a try needs: no resend
            "short": svc(blackhole, ok, timeout_ms=105, **policy)["svc"],
        }
    )
    started = time.monotonic()
    replies = await at_once(mesh, [get("/behave"), post("/echo", b"hi")] * 4)
    assert [r.status for r in replies] == [200] * 8
    assert time.monotonic() - started < 0.6  # one connect timeout, then at once elsewhere
    assert (await counters(mesh))["counters"]["retries_unsent"] == 4  # round robin: half

    (first,) = await request(mesh.outbound, get("/behave", "short"))
    assert (first.status, first.header("x-meshlet-error")) == (502, "upstream-connect-failure")


async def test_a_connection_closed_before_the_request_is_written_is_resent(
    closed_before_written: RawUpstream, upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ok = await upstreams("ok")
    mesh = await make_mesh(svc(closed_before_written.port, ok, **NO_RETRIES))
    replies = await at_once(mesh, [get("/behave"), post("/echo", b"hello")] * 8)
    assert [r.status for r in replies] == [200] * 16
    c = (await counters(mesh))["counters"]
    assert c["retries_unsent"] == closed_before_written.connections == 8
    assert c["retries"] == 8
    found = samples(await scrape(mesh))
    assert value(found, "meshlet_retries_unsent_total", service="svc") == 8
    assert value(found, "meshlet_upstream_retries_total", service="svc", reason="reset") == 8


async def test_the_budget_bounds_resends(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    ok = await upstreams("ok")
    no_budget = {"ratio": 0, "min_per_s": 0}
    mesh = await make_mesh(svc(free_port(), ok, retry_budget=no_budget, **NO_RETRIES))
    replies = await at_once(mesh, [get("/behave")] * 8)
    refused = [r for r in replies if r.status != 200]
    assert len(refused) == 4  # round robin: the dead endpoint's share
    assert {r.header("x-meshlet-error") for r in refused} == {"upstream-connect-failure"}
    c = (await counters(mesh))["counters"]
    assert (c["retries_unsent"], c["retries_suppressed"]) == (0, 4)


def read_then_reset(seen: list[bytes]) -> Callable[..., Awaitable[None]]:
    """Read the whole request (head and Content-Length body), then reset the connection."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        seen.append(head + await reader.readexactly(length))
        await reset_at_once(reader, writer)

    return handler


async def test_a_request_sent_then_reset_is_retried_only_when_idempotent(
    raw_upstream: RawUpstreams, upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    """The sent request reached the upstream (which may have acted on it): a POST is not
    tried again, a GET is (after a backoff, under max_retries)."""
    seen: list[bytes] = []
    crash = await raw_upstream(read_then_reset(seen))
    ok = await upstreams("ok")
    mesh = await make_mesh(svc(crash.port, ok, outlier=NO_OUTLIER))  # round robin: crash first
    (lost,) = await request(mesh.outbound, post("/echo", b"pay 10"))
    assert (lost.status, lost.header("x-meshlet-error")) == (502, "upstream-reset")
    assert seen[-1].endswith(b"\r\n\r\npay 10")  # the upstream had all of it
    (other,) = await request(mesh.outbound, post("/echo", b"pay 10"))  # ok's turn
    assert other.status == 200
    (retried,) = await request(mesh.outbound, get("/behave"))
    assert retried.status == 200
    asked = post("/echo", b"pay 10", "x-meshlet-retry: on\r\n")  # the caller says it is safe
    await request(mesh.outbound, get("/behave"))  # (ok's turn)
    (again,) = await request(mesh.outbound, asked)
    assert again.status == 200
    assert len(seen) == 3
    c = (await counters(mesh))["counters"]
    assert (c["retries"], c["retries_unsent"]) == (2, 0)


async def test_max_retries_limits_sent_retries_and_the_default_lets_callers_leave(
    raw_upstream: RawUpstreams, upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    """32 callers at once, a quarter of them first on an upstream that resets after reading
    their request: with the default max_retries (1024) all are retried elsewhere; with 3,
    only three at a time are, and the rest are answered with their failure."""
    seen: list[bytes] = []
    crash = await raw_upstream(read_then_reset(seen))
    ok = [await upstreams(f"ok{i}") for i in range(3)]
    default = await make_mesh(svc(crash.port, *ok, outlier=NO_OUTLIER))
    replies = await at_once(default, [get("/behave")] * 32)
    assert [r.status for r in replies] == [200] * 32
    c = (await counters(default))["counters"]
    assert (c["retries"], c["retries_over_limit"], c["retrying"]) == (8, 0, 0)

    three = await make_mesh(svc(crash.port, *ok, outlier=NO_OUTLIER, max_retries=3))
    replies = await at_once(three, [get("/behave")] * 32)
    failed = [r for r in replies if r.status != 200]
    c = (await counters(three))["counters"]
    assert 1 <= len(failed) <= 5
    assert {r.header("x-meshlet-error") for r in failed} == {"upstream-reset"}
    assert c["retries_over_limit"] == len(failed)
    assert c["retries"] + len(failed) == 8
    assert c["retrying"] == 0
