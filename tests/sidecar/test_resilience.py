"""Retries, budgets, per-try timeouts, deadlines, limits, ejection and panic, through an
in-process sidecar to real upstream servers."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.processes import free_port
from tests.sidecar.conftest import (
    LOCAL,
    NO_OUTLIER,
    Mesh,
    Response,
    Upstream,
    each,
    get,
    request,
    svc,
)

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]


async def counters(mesh: Mesh) -> dict[str, Any]:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/clusters") as r,
    ):
        data: dict[str, Any] = (await r.json())["services"]["svc"]
    return data


async def test_a_retriable_status_is_retried_on_another_endpoint(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    busy, ok = await upstreams("busy"), await upstreams("ok")
    mesh = await make_mesh(svc(busy, ok, outlier=NO_OUTLIER))
    responses = await each(mesh, get("/behave"), 10)
    assert [r.status for r in responses] == [200] * 10
    assert {json.loads(r.body)["server"] for r in responses} == {"ok"}
    assert busy.hits == 5  # round robin sent it every other first try
    assert (await counters(mesh))["counters"]["retries"] == 5


async def test_only_idempotent_requests_are_retried_unless_asked(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    bad, ok = await upstreams("fail"), await upstreams("ok")
    mesh = await make_mesh(svc(bad, ok, outlier=NO_OUTLIER, retry_on=[500]))
    post = b"POST /behave HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi"
    statuses = [r.status for r in await each(mesh, post, 4)]
    assert sorted(statuses) == [200, 200, 500, 500]  # the upstream's 500 passes through
    asked = post.replace(b"Host: svc\r\n", b"Host: svc\r\nx-meshlet-retry: on\r\n")
    assert [r.status for r in await each(mesh, asked, 4)] == [200] * 4
    # a request that an outer hop will retry is not retried again here
    outer = get("/behave", extra="x-meshlet-attempt: 1\r\n")
    statuses = [r.status for r in await each(mesh, outer, 4)]
    assert sorted(statuses) == [200, 200, 500, 500]


async def test_a_refused_connect_is_retried_elsewhere(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ok = await upstreams("ok")
    mesh = await make_mesh(svc(free_port(), ok, outlier=NO_OUTLIER))
    responses = await each(mesh, get("/behave"), 6)
    assert [r.status for r in responses] == [200] * 6
    assert (await counters(mesh))["counters"]["retries"] == 3


async def test_a_stalled_try_times_out_and_the_retry_answers(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    stall, ok = await upstreams("stall"), await upstreams("ok")
    mesh = await make_mesh(svc(stall, ok, timeout_ms=2000, outlier=NO_OUTLIER))
    started = time.monotonic()
    (first,) = await request(mesh.outbound, get("/behave"))  # round robin: stall first
    took = time.monotonic() - started
    assert first.status == 200
    assert json.loads(first.body)["server"] == "ok"
    assert 0.9 < took < 1.6  # the per-try timeout: 2000 ms / (1 retry + 1)


async def test_the_budget_caps_retries_and_counts_the_rest(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    a, b = await upstreams("busy-a"), await upstreams("busy-b")
    budget = {"ratio": 0, "min_per_s": 1}  # ten retries per ten seconds, whatever the traffic
    mesh = await make_mesh(svc(a, b, outlier=NO_OUTLIER, retry_budget=budget))
    responses = await each(mesh, get("/behave"), 20)
    assert [r.status for r in responses] == [503] * 20  # fast, and the upstream's own answer
    assert a.hits + b.hits == 30
    c = (await counters(mesh))["counters"]
    assert (c["retries"], c["retries_suppressed"]) == (10, 10)


async def test_over_max_requests_is_503_overloaded_at_once(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    up = await upstreams("u")
    mesh = await make_mesh(svc(up, max_requests=1))
    slow = asyncio.create_task(request(mesh.outbound, get("/slow?delay=1")))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    (refused,) = await request(mesh.outbound, get("/behave"))
    assert time.monotonic() - started < 0.5
    assert (refused.status, refused.header("x-meshlet-error")) == (503, "overloaded")
    assert (await slow)[0].status == 200
    assert (await counters(mesh))["counters"]["overloaded"] == 1


async def test_deadlines_travel_and_are_honoured(upstreams: Upstreams, make_mesh: MakeMesh) -> None:
    ok, stall = await upstreams("ok"), await upstreams("stall")
    mesh = await make_mesh({**svc(ok), "stalls": svc(stall, outlier=NO_OUTLIER)["svc"]})
    (resp,) = await request(mesh.outbound, get("/behave"))
    mesh_headers = json.loads(resp.body)["mesh"]
    assert mesh_headers["x-meshlet-attempt"] == "1"
    # the try's time left: a 15 s route with one retry gives each try 7.5 s
    assert 7_000 < int(mesh_headers["x-meshlet-deadline-ms"]) <= 7_500
    (resp,) = await request(mesh.outbound, get("/behave", extra="x-meshlet-timeout-ms: 300\r\n"))
    assert int(json.loads(resp.body)["mesh"]["x-meshlet-deadline-ms"]) <= 300
    # a deadline already spent: 504 at once, nothing sent
    hits = ok.hits
    (spent,) = await request(mesh.outbound, get("/behave", extra="x-meshlet-deadline-ms: 0\r\n"))
    assert (spent.status, spent.header("x-meshlet-error")) == (504, "upstream-timeout")
    assert ok.hits == hits
    # a caller's deadline shorter than the route timeout ends the wait, with no retry
    started = time.monotonic()
    (late,) = await request(
        mesh.outbound, get("/behave", "stalls", extra="x-meshlet-deadline-ms: 300\r\n")
    )
    assert late.status == 504
    assert time.monotonic() - started < 1.0
    assert stall.hits == 1


async def test_a_failing_endpoint_is_ejected_then_probed_back(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    bad = await upstreams("fail")
    good = [await upstreams(f"ok{i}") for i in range(3)]
    outlier = {"base_ejection_ms": 500}
    mesh = await make_mesh(svc(bad, *good, retries=0, outlier=outlier))
    statuses = [r.status for r in await each(mesh, get("/behave"), 40)]
    assert bad.hits == 5  # five in a row, then out
    assert statuses.count(500) == 5
    data = await counters(mesh)
    assert data["counters"]["ejections"] == 1
    assert data["endpoints"][0]["outlier"] == "ejected"
    await asyncio.sleep(0.6)
    bad.behave_as("ok-again")
    statuses = [r.status for r in await each(mesh, get("/behave"), 8)]
    assert statuses == [200] * 8
    assert bad.hits >= 6  # one probe (and maybe its turn after)
    assert (await counters(mesh))["endpoints"][0]["outlier"] == "healthy"
    hits = bad.hits
    await each(mesh, get("/behave"), 8)
    assert bad.hits == hits + 2  # restored: its full share again


async def test_everything_failing_panics_and_answers_fast(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ups = [await upstreams(f"fail{i}") for i in range(4)]
    mesh = await make_mesh(svc(*ups, retry_on=[500], panic_threshold=75))
    started = time.monotonic()
    statuses = [r.status for r in await each(mesh, get("/behave"), 60)]
    assert time.monotonic() - started < 5
    assert statuses == [500] * 60
    c = (await counters(mesh))["counters"]
    assert c["ejections"] == 2  # 50 % at most
    assert c["panics"] > 0  # 2 of 4 left < 75 %: balance over all
    assert c["retries"] + c["retries_suppressed"] == 60
    assert c["retries"] <= 0.2 * 60 + 100
    assert sum(u.hits for u in ups) == 60 + c["retries"]


async def test_a_retried_4xx_is_no_failure_of_the_endpoint(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    """retry_on may list a 429: retried elsewhere, but a 4xx is the client's, not the
    endpoint's failure (no penalty, no ejection), as when it is the answer."""
    limit, ok = await upstreams("limit"), await upstreams("ok")
    mesh = await make_mesh(svc(limit, ok, retry_on=[429], outlier={"consecutive_failures": 1}))
    assert [r.status for r in await each(mesh, get("/behave"), 6)] == [200] * 6
    assert limit.hits >= 1
    data = await counters(mesh)
    rows = {e["port"]: e for e in data["endpoints"]}
    assert data["counters"]["retries"] == limit.hits
    assert (rows[limit.port]["penalty_ms"], rows[limit.port]["outlier"]) == (0, "healthy")


HEDGE = {"hedge": {"after_ms": 50}, "outlier": NO_OUTLIER}


async def timed(mesh: Mesh, raw: bytes) -> tuple[Response, float]:
    started = time.monotonic()
    (resp,) = await request(mesh.outbound, raw)
    return resp, time.monotonic() - started


async def test_a_hedged_try_answers_for_a_stalled_first_try(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    stall, ok = await upstreams("stall"), await upstreams("ok")
    mesh = await make_mesh(svc(stall, ok, **HEDGE))
    replies = [await timed(mesh, get("/behave")) for _ in range(4)]
    assert {(r.status, json.loads(r.body)["server"]) for r, _ in replies} == {(200, "ok")}
    assert all(seconds < 1.0 for _, seconds in replies)
    c = (await counters(mesh))["counters"]
    assert c["hedges"] == c["hedges_won"] == stall.hits >= 1  # each stall met was hedged
    hedged = [json.loads(r.body)["mesh"]["x-meshlet-attempt"] for r, s in replies if s > 0.05]
    assert hedged == ["2"] * stall.hits
    assert c["in_flight"] == 0


async def test_the_first_response_wins_whichever_try_sent_it(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    """Both tries run: the 150 ms endpoint answers, the stalled one is cut off; when the
    late one was the hedge (attempt 2), the hedge won."""
    late, stall = await upstreams("late"), await upstreams("stall")
    mesh = await make_mesh(svc(late, stall, **HEDGE))
    replies = [await timed(mesh, get("/behave")) for _ in range(4)]
    assert {(r.status, json.loads(r.body)["server"]) for r, _ in replies} == {(200, "late")}
    assert all(0.15 <= seconds < 1.0 for _, seconds in replies)
    c = (await counters(mesh))["counters"]
    won = sum(json.loads(r.body)["mesh"]["x-meshlet-attempt"] == "2" for r, _ in replies)
    assert (c["hedges"], c["hedges_won"]) == (4, won)
    assert (late.hits, stall.hits) == (4, 4)
    await asyncio.sleep(0.05)
    data = await counters(mesh)
    assert data["counters"]["in_flight"] == 0
    assert [e["in_flight"] for e in data["endpoints"]] == [0, 0]  # the losers were let go


async def test_a_failed_hedge_leaves_the_first_try_to_answer(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    late = await upstreams("late")
    mesh = await make_mesh(svc(late, free_port(), **HEDGE))
    replies = [await timed(mesh, get("/behave")) for _ in range(4)]
    assert [r.status for r, _ in replies] == [200] * 4
    c = (await counters(mesh))["counters"]
    assert c["hedges"] >= 1
    assert c["hedges_won"] == 0


async def test_only_requests_that_may_be_retried_are_hedged(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    late, ok = await upstreams("late"), await upstreams("ok")
    mesh = await make_mesh(svc(late, ok, **HEDGE))
    post = b"POST /behave HTTP/1.1\r\nHost: svc\r\nContent-Length: 2\r\n\r\nhi"
    inner = get("/behave", extra="x-meshlet-attempt: 1\r\n")  # an earlier hop's try
    for raw in (post, post, inner, inner):
        (resp,) = await request(mesh.outbound, raw)
        assert resp.status == 200
    assert (await counters(mesh))["counters"]["hedges"] == 0
    assert late.hits == 2
