"""Faults injected into real processes: a caller's sidecar in front of backends that fail,
die, stall, or sit at the end of a three-hop chain. Every test asserts counts."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.processes import Backend, Sidecar, free_port

pytestmark = pytest.mark.slow
StartBackend = Callable[..., Backend]
StartSidecar = Callable[..., Sidecar]


@dataclass
class Reply:
    status: int  # 0: the connection to the sidecar failed
    body: str
    error: str  # x-meshlet-error
    seconds: float


@pytest.fixture
def backend(tmp_path: Path) -> Iterator[StartBackend]:
    """Start ``tests/backend.py`` processes; stopped or not, they are killed at the end."""
    started: list[Backend] = []

    def start(name: str, *args: str) -> Backend:
        b = Backend(tmp_path / "logs", name, *args)
        started.append(b)
        return b

    yield start
    for b in started:
        if b.proc.poll() is None:
            os.kill(b.proc.pid, signal.SIGCONT)
        b.kill()


def caller(
    start: StartSidecar,
    path: Path,
    services: dict[str, tuple[dict[str, Any], list[int]]],
    *args: str,
) -> Sidecar:
    """A sidecar whose static table sends each service to the given loopback ports."""
    write_table(path, services)
    return start("--service", path.stem, "--table", str(path), "--app-health", "none", *args)


def write_table(path: Path, services: dict[str, tuple[dict[str, Any], list[int]]]) -> None:
    """A static table (replaced whole: a sidecar never reads half of one)."""
    table = {
        "services": {
            name: {
                "policy": policy,
                "endpoints": [{"address": "127.0.0.1", "port": p} for p in ports],
            }
            for name, (policy, ports) in services.items()
        }
    }
    path.with_suffix(".tmp").write_text(json.dumps(table))
    path.with_suffix(".tmp").replace(path)


async def call(
    session: aiohttp.ClientSession,
    sidecar: Sidecar,
    host: str,
    path: str = "/whoami",
    headers: dict[str, str] | None = None,
) -> Reply:
    started = time.monotonic()
    url = f"http://127.0.0.1:{sidecar.ports['outbound']}{path}"
    try:
        async with session.get(url, headers={"Host": host, **(headers or {})}) as r:
            body = await r.text()
            return Reply(r.status, body, r.headers.get("x-meshlet-error", ""), _since(started))
    except aiohttp.ClientError as e:
        return Reply(0, repr(e), "", _since(started))


def _since(started: float) -> float:
    return time.monotonic() - started


async def load(
    session: aiohttp.ClientSession, sidecar: Sidecar, host: str, seconds: float, workers: int
) -> list[Reply]:
    """``workers`` closed loops of GETs for ``seconds`` (at most 5,000 requests each)."""
    replies: list[Reply] = []
    until = time.monotonic() + seconds

    async def worker() -> None:
        for _ in range(5000):
            if time.monotonic() >= until:
                return
            replies.append(await call(session, sidecar, host))

    await asyncio.gather(*(worker() for _ in range(workers)))
    return replies


def service(sidecar: Sidecar, name: str) -> dict[str, Any]:
    status, data = sidecar.admin("/clusters")
    assert status == 200
    found: dict[str, Any] = data["services"][name]
    return found


def phases(sidecar: Sidecar, name: str) -> dict[int, str]:
    return {e["port"]: e["outlier"] for e in service(sidecar, name)["endpoints"]}


async def session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))


async def test_a_failing_instance_is_ejected_within_five_failures_and_returns(
    backend: StartBackend, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    """1. One of four answers 503: out after five failures, no share while out, back after
    the ejection time once healthy (its probe succeeds)."""
    bs = [backend(f"b{i}") for i in range(4)]
    policy = {"lb": "round_robin", "retries": 0, "outlier": {"base_ejection_ms": 2000}}
    sc = caller(sidecar_process, tmp_path / "c.json", {"svc": (policy, [b.port for b in bs])})
    async with await session() as http:
        warm = [await call(http, sc, "svc") for _ in range(40)]
        assert {r.body for r in warm} == {"b0", "b1", "b2", "b3"}
        bs[0].proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.2)
        replies = [await call(http, sc, "svc") for _ in range(100)]
        failed = [r for r in replies if r.status != 200]
        assert 1 <= len(failed) <= 5
        assert {r.body for r in failed} == {"b0 failing"}
        assert phases(sc, "svc")[bs[0].port] == "ejected"
        assert service(sc, "svc")["counters"]["ejections"] == 1
        hits = bs[0].hits()
        assert all(r.status == 200 for r in replies[40:])
        assert bs[0].hits() == hits  # no share while ejected

        bs[0].proc.send_signal(signal.SIGUSR1)  # healthy again
        await asyncio.sleep(2.2)
        back = [await call(http, sc, "svc") for _ in range(40)]
        assert all(r.status == 200 for r in back)
        assert sum(r.body == "b0" for r in back) >= 5  # its round-robin share again
        assert phases(sc, "svc")[bs[0].port] == "healthy"


async def test_kill_9_of_an_instance_under_load_fails_no_request(
    backend: StartBackend, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    """2. Requests in flight to a killed instance (reset before any response byte) and the
    connects it refuses afterwards are retried elsewhere: no client sees a failure."""
    bs = [backend(f"b{i}") for i in range(4)]
    sc = caller(sidecar_process, tmp_path / "c.json", {"svc": ({}, [b.port for b in bs])})
    async with await session() as http:
        running = asyncio.create_task(load(http, sc, "svc", 3.0, workers=8))
        await asyncio.sleep(1.0)
        bs[1].proc.kill()
        replies = await running
    assert len(replies) > 200
    assert [r for r in replies if r.status != 200] == []
    assert sum(r.body == "b1" for r in replies) > 0  # it had its share before
    svc = service(sc, "svc")
    # the 8 requests in flight when it died, then a few refused connects: after those the
    # balancer's failure penalty (or an ejection) keeps every pick away from it (each pick of
    # it would be one more retry). The penalty decays while nothing picks it, so how much of
    # it is left 2 s later depends on when the last failure was: it only has to be there.
    assert 1 <= svc["counters"]["retries"] <= 8 + 5
    (dead,) = [e for e in svc["endpoints"] if e["port"] == bs[1].port]
    assert dead["outlier"] == "ejected" or dead["penalty_ms"] > 0


async def test_a_stalled_instance_costs_one_per_try_timeout(
    backend: StartBackend, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    """3. SIGSTOP: the kernel still accepts connections, nothing answers. Tries to it time
    out after ``per_try_timeout_ms`` and go elsewhere; p99 stays under the route timeout."""
    bs = [backend(f"b{i}") for i in range(4)]
    # four callers can all be waiting on the stalled one at once: the default max_retries
    # (1024) lets them all retry (3, the old default, answered the fourth with its 504)
    policy = {"lb": "round_robin", "timeout_ms": 3000, "per_try_timeout_ms": 300}
    sc = caller(sidecar_process, tmp_path / "c.json", {"svc": (policy, [b.port for b in bs])})
    async with await session() as http:
        running = asyncio.create_task(load(http, sc, "svc", 3.0, workers=4))
        await asyncio.sleep(0.5)
        bs[2].proc.send_signal(signal.SIGSTOP)
        replies = await running
    assert [r for r in replies if r.status != 200] == []
    slow = [r for r in replies if r.seconds >= 0.3]
    assert 1 <= len(slow) <= 20  # tries that met the stall, until it was ejected
    assert all(r.seconds < 0.3 + 0.6 for r in slow)  # one per-try timeout, then elsewhere
    p99 = statistics.quantiles([r.seconds for r in replies], n=100)[98]
    assert p99 < 3.0
    assert phases(sc, "svc")[bs[2].port] == "ejected"


async def test_when_every_instance_fails_retries_stay_in_budget_and_503s_come_fast(
    backend: StartBackend, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    """4. All four answer 503: each request has one retry at most, and the retries fit the
    budget (20% of requests + 1/s over 10 s here); all get ejected, so the balancer panics
    and spreads over all of them; every caller gets its 503 at once; nothing is left in
    flight."""
    bs = [backend(f"b{i}") for i in range(4)]
    for b in bs:
        b.proc.send_signal(signal.SIGUSR1)
    policy = {
        "retry_budget": {"ratio": 0.2, "min_per_s": 1},
        "max_retries": 10,  # the budget, not the concurrent-retry limit, is under test
        "outlier": {"max_ejection_percent": 100},
    }
    sc = caller(sidecar_process, tmp_path / "c.json", {"svc": (policy, [b.port for b in bs])})
    await asyncio.sleep(0.2)
    async with await session() as http:
        replies = await load(http, sc, "svc", 1.5, workers=4)
    n = len(replies)
    assert n > 50
    assert {r.status for r in replies} == {503}
    counters = service(sc, "svc")["counters"]
    assert sum(b.hits() for b in bs) == n + counters["retries"]  # every try counted
    assert 1 <= counters["retries"] <= 0.2 * n + 10
    assert counters["retries_suppressed"] >= 1
    assert counters["retries_over_limit"] == 0
    assert counters["panics"] >= 1
    assert max(r.seconds for r in replies) < 1.0
    assert statistics.median(r.seconds for r in replies) < 0.1
    assert (counters["in_flight"], counters["pending"], counters["retrying"]) == (0, 0, 0)
    assert set(phases(sc, "svc").values()) == {"ejected"}


async def test_a_three_hop_chain_retries_once_and_times_out_where_time_runs_out(
    backend: StartBackend, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    """5. client -> sidecar A -> sidecar B (inbound) -> app B -> sidecar B (outbound) ->
    sidecar C (inbound) -> app C, every hop with the default retries. App B forwards the
    x-meshlet-* headers, as apps forward trace headers."""
    c = backend("c")
    side_c = caller(sidecar_process, tmp_path / "c.json", {}, "--app", f"http://127.0.0.1:{c.port}")
    app_b = free_port()
    to_c = [side_c.ports["inbound"]]
    side_b = caller(
        sidecar_process,
        tmp_path / "b.json",
        {"c": ({}, to_c), "c-short": ({"timeout_ms": 200, "connect_timeout_ms": 100}, to_c)},
        "--app",
        f"http://127.0.0.1:{app_b}",
    )
    b = backend("b", "--port", str(app_b), "--outbound", str(side_b.ports["outbound"]))
    side_a = caller(sidecar_process, tmp_path / "a.json", {"b": ({}, [side_b.ports["inbound"]])})

    async with await session() as http:
        ok = await call(http, side_a, "b", "/chain?to=c")
        assert (ok.status, ok.body) == (200, "b got 200 : c")

        # C fails: A retries (the outermost hop); B sees x-meshlet-attempt and does not
        c.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.2)
        before = c.hits()
        failed = [await call(http, side_a, "b", "/chain?to=c") for _ in range(10)]
        assert {(r.status, r.body) for r in failed} == {(503, "b got 503 : c failing")}
        assert c.hits() - before == 20  # two per client request, not 2 x 2 (or 2^3)
        assert service(side_a, "b")["counters"]["retries"] == 10
        assert service(side_b, "c")["counters"]["retries"] == 0
        c.proc.send_signal(signal.SIGUSR1)

        # C takes 3 s; the client allows 600 ms. A and B (which got the deadline with the
        # request) both give up at 600 ms, instead of B waiting 3 s for C: whichever fires
        # first answers (B's deadline is A's less the whole milliseconds A rounded down)
        slow = "/chain?to=c&path=sleep%3Fms%3D3000"
        late = await call(http, side_a, "b", slow, {"x-meshlet-timeout-ms": "600"})
        assert late.status == 504
        assert late.error == "upstream-timeout" or late.body.startswith("b got 504 upstream-ti")
        assert 0.55 < late.seconds < 1.0
        await asyncio.sleep(0.3)
        assert service(side_b, "c")["counters"]["in_flight"] == 0

        # B's own route to C allows 200 ms: B runs out first and its 504 reaches the client
        short = "/chain?to=c-short&path=sleep%3Fms%3D3000"
        late = await call(http, side_a, "b", short, {"x-meshlet-timeout-ms": "1000"})
        assert late.status == 504
        assert late.body.startswith("b got 504 upstream-timeout: ")
        assert late.seconds < 1.0
    assert b.proc.poll() is None


KILL_ROUNDS = 20
KILL_POLICIES = ("round_robin", "least_request", "peak_ewma")


def svc_of(lb: str) -> str:
    """The service balanced by ``lb`` (a service name is a DNS label)."""
    return lb.replace("_", "-")


async def test_twenty_kill_9_rounds_across_policies_fail_no_request(
    backend: StartBackend, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    """6. Issue 11, item 1: twenty rounds, ``round_robin``, ``least_request`` and
    ``peak_ewma`` in turn, of eight closed-loop clients calling a service of four instances
    while one of them is killed with SIGKILL; then a new instance takes its place in the
    table (SIGHUP). Tries the dead one refuses (never sent) go elsewhere at once, and the
    requests it took down with it are retried: no client sees an error."""
    live = [backend(f"b{i}") for i in range(4)]
    path = tmp_path / "c.json"

    def services() -> dict[str, tuple[dict[str, Any], list[int]]]:
        # slow start off: a new instance takes its full share at once, and so has requests
        # in flight when its turn to be killed comes
        ports = [b.port for b in live]
        return {svc_of(lb): ({"lb": lb, "slow_start_ms": 0}, ports) for lb in KILL_POLICIES}

    sc = caller(sidecar_process, path, services())
    replies: list[tuple[int, str, Reply]] = []  # (round, policy, reply)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:

        async def clients(r: int, lb: str, stop: asyncio.Event) -> None:
            until = time.monotonic() + 5.0  # bounded, whatever happens to ``stop``

            async def worker() -> None:
                for _ in range(2000):
                    if stop.is_set() or time.monotonic() >= until:
                        return
                    replies.append((r, lb, await call(http, sc, svc_of(lb))))

            await asyncio.gather(*(worker() for _ in range(8)))

        for r in range(KILL_ROUNDS):
            lb = KILL_POLICIES[r % len(KILL_POLICIES)]
            stop = asyncio.Event()
            running = asyncio.create_task(clients(r, lb, stop))
            spare = asyncio.create_task(asyncio.to_thread(backend, f"n{r}"))
            await asyncio.sleep(0.3)
            victim = r % len(live)
            served = sum(1 for n, _, x in replies if n == r and x.body == live[victim].name)
            assert served > 0, f"round {r}: {live[victim].name} had no share before its kill"
            live[victim].proc.kill()  # SIGKILL, with requests in flight
            await asyncio.sleep(0.5)
            live[victim] = await spare
            stop.set()
            await running
            write_table(path, services())  # the new instance takes the dead one's place
            sc.proc.send_signal(signal.SIGHUP)
            want = {b.port for b in live}
            deadline = time.monotonic() + 5.0
            while {e["port"] for e in service(sc, svc_of(lb))["endpoints"]} != want:
                assert time.monotonic() < deadline, "the sidecar did not reload its table"
                await asyncio.sleep(0.02)

    failed = collections.Counter((lb, x.status, x.error) for _, lb, x in replies if x.status != 200)
    assert not failed, f"{failed.total()} of {len(replies)} requests failed: {dict(failed)}"
    assert min(sum(1 for n, _, _ in replies if n == r) for r in range(KILL_ROUNDS)) > 50
    counters = {lb: service(sc, svc_of(lb))["counters"] for lb in KILL_POLICIES}
    for c in counters.values():
        assert c["retries_over_limit"] == 0
        assert (c["in_flight"], c["pending"], c["retrying"]) == (0, 0, 0)
    # the connects the dead instances refused were resent; under peak_ewma their first
    # failures usually steered every pick away from them before another connect
    assert counters["round_robin"]["retries_unsent"] >= KILL_ROUNDS // 3
    assert counters["least_request"]["retries_unsent"] >= 1
    assert sc.proc.poll() is None
