"""``GET /metrics`` in-process: the values after real registrations, heartbeats, expiry,
sidecar streams, pushes, ACKs and NACKs; and ``promtool check metrics`` on the output."""

from __future__ import annotations

import asyncio
import shutil

import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from control_plane import api as api_module
from control_plane.clock import FakeClock
from control_plane.store_memory import MemoryStore
from control_plane.wire import Ack, Heartbeat, Nack
from tests.conftest import Api, MakeApi
from tests.control_plane.test_publisher import Sidecar, connect, hello

CONVERGED = "meshlet_push_convergence_seconds_count"
CONVERGED_SUM = "meshlet_push_convergence_seconds_sum"


async def scrape(api: Api) -> dict[str, float]:
    """Every sample, keyed as the exposition writes it: ``name{label="value",...}``."""
    async with api.get("/metrics") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
        text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


async def settled(api: Api, name: str, expected: float, within: float = 3.0) -> dict[str, float]:
    """Scrape until ``name`` reads ``expected`` (stream messages are handled a moment after
    they are sent); fail naming the last value read."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        samples = await scrape(api)
        if samples.get(name) == expected or loop.time() > deadline:
            assert samples.get(name) == expected, f"{name} is {samples.get(name)}"
            return samples
        await asyncio.sleep(0.01)


def instances(samples: dict[str, float], service: str) -> dict[str, float]:
    prefix = f'meshlet_registry_instances{{service="{service}",status="'
    return {k[len(prefix) : -2]: v for k, v in samples.items() if k.startswith(prefix)}


def protection(service: str) -> str:
    return f'meshlet_protection_active{{service="{service}"}}'


async def register(api: Api, service: str, instance_id: str) -> None:
    body = {"id": instance_id, "address": "10.0.0.1", "port": 8000}
    async with api.post(f"/v1/services/{service}/instances", json=body) as r:
        assert r.status == 201, await r.text()


async def heartbeat(api: Api, service: str, *ids: str) -> None:
    for instance_id in ids:
        async with api.put(f"/v1/services/{service}/instances/{instance_id}/heartbeat") as r:
            assert r.status == 200, await r.text()


async def expire(api: Api) -> None:
    """One reaper sweep now, rather than waiting up to a second for the background one."""
    await api.app[api_module.REGISTRY].expire()


@pytest.fixture
async def cp(make_api: MakeApi) -> Api:
    return await make_api(store=MemoryStore(), debounce_quiet=0.05, debounce_max=0.5)


async def test_instances_by_service_and_status(cp: Api, clock: FakeClock) -> None:
    for instance_id in ("i1", "i2", "i3"):
        await register(cp, "a", instance_id)
    await register(cp, "b", "j1")
    async with cp.patch("/v1/services/a/instances/i3", json={"status": "draining"}) as r:
        assert r.status == 200
    clock.advance(16)
    await heartbeat(cp, "a", "i1")
    await heartbeat(cp, "b", "j1")
    await expire(cp)  # i2 missed its heartbeat
    samples = await scrape(cp)
    assert instances(samples, "a") == {"healthy": 1, "unhealthy": 1, "draining": 1}
    assert instances(samples, "b") == {"healthy": 1, "unhealthy": 0, "draining": 0}
    assert samples["meshlet_heartbeats_total"] == 2
    assert samples[protection("a")] == samples[protection("b")] == 0
    assert samples["meshlet_instances_expired_total"] == 0


async def test_protection_holds_a_service_then_expiry_resumes(cp: Api, clock: FakeClock) -> None:
    a = [f"i{n}" for n in range(1, 8)]
    for instance_id in a:
        await register(cp, "a", instance_id)
    for instance_id in ("j1", "j2", "j3"):
        await register(cp, "b", instance_id)
    await heartbeat(cp, "a", *a)  # a first heartbeat each: junk that never sends one
    await heartbeat(cp, "b", "j1", "j2", "j3")  # cannot hold protection
    clock.advance(16)
    await heartbeat(cp, "a", *a)
    await expire(cp)  # 3 of 10 lapsed at once: protection
    samples = await scrape(cp)
    assert (samples[protection("a")], samples[protection("b")]) == (0, 1)
    assert instances(samples, "b")["healthy"] == 3  # held as they were

    clock.advance(16)  # b's instances are past remove-after, but held
    await heartbeat(cp, "a", *a)
    await expire(cp)
    samples = await scrape(cp)
    assert samples[protection("b")] == 1
    assert samples["meshlet_instances_expired_total"] == 0

    await heartbeat(cp, "b", "j1", "j2")  # only j3 is still silent: a lone dead instance
    await expire(cp)
    samples = await scrape(cp)
    assert (samples[protection("a")], samples[protection("b")]) == (0, 0)
    assert samples["meshlet_instances_expired_total"] == 1
    assert instances(samples, "b") == {"healthy": 2, "unhealthy": 0, "draining": 0}
    assert samples["meshlet_heartbeats_total"] == 26


async def test_each_app_has_its_own_metrics(make_api: MakeApi) -> None:
    first = await make_api(store=MemoryStore())
    second = await make_api(store=MemoryStore(), admin_token="secret")
    await register(first, "a", "i1")
    await heartbeat(first, "a", "i1")
    assert (await scrape(first))["meshlet_heartbeats_total"] == 1
    samples = await scrape(second)  # no token needed to scrape
    assert samples["meshlet_heartbeats_total"] == 0
    assert instances(samples, "a") == {}


async def until_service(sidecar: Sidecar, service: str) -> tuple[int, int]:
    """Read tables until one has ``service``: (its version, tables read)."""
    read = 1
    table = await sidecar.next_table()
    while service not in table.services:
        table = await sidecar.next_table()
        read += 1
    return table.version, read


async def test_a_sidecar_stream(cp: Api) -> None:
    side = await connect(cp, hello(1))
    await settled(cp, "meshlet_connected_sidecars", 1)
    version, pushed = await until_service(side, "svc")
    await settled(cp, "meshlet_pushes_total", pushed)
    assert (await scrape(cp))[CONVERGED] == 0  # sent, not yet acknowledged

    await side.send(Ack(version))
    samples = await settled(cp, CONVERGED, 1)
    # the hello registered the instance, then the quiet debounce window passed before the push
    assert 0.05 <= samples[CONVERGED_SUM] < 3
    assert samples['meshlet_push_convergence_seconds_bucket{le="0.025"}'] == 0
    assert samples['meshlet_push_convergence_seconds_bucket{le="+Inf"}'] == 1

    await side.send(Heartbeat("healthy"))
    await side.send(Heartbeat("healthy"))
    await heartbeat(cp, "svc", "i1")
    await settled(cp, "meshlet_heartbeats_total", 3)  # stream and REST heartbeats both

    await side.ws.close()
    samples = await settled(cp, "meshlet_connected_sidecars", 0)
    assert samples["meshlet_nacks_total"] == 0


async def test_convergence_waits_for_the_last_sidecar(cp: Api) -> None:
    a = await connect(cp, hello(1, "a"))
    await a.send(Ack((await until_service(a, "a"))[0]))
    b = await connect(cp, hello(2, "b"))
    for side in (a, b):
        await side.send(Ack((await until_service(side, "b"))[0]))
    await asyncio.sleep(0.1)
    before = await scrape(cp)

    async with cp.patch("/v1/services/a/instances/i1", json={"weight": 7}) as r:
        assert r.status == 200
    version = (await a.next_table()).version
    assert (await b.next_table()).version == version
    await a.send(Ack(version))
    await asyncio.sleep(0.2)
    assert (await scrape(cp))[CONVERGED] == before[CONVERGED]  # b has not acknowledged
    await b.send(Ack(version))
    after = await settled(cp, CONVERGED, before[CONVERGED] + 1)
    assert after[CONVERGED_SUM] - before[CONVERGED_SUM] >= 0.05 + 0.2


async def test_a_nack_is_counted_and_not_taken_for_convergence(cp: Api) -> None:
    side = await connect(cp, hello(1))
    version, _ = await until_service(side, "svc")
    await side.send(Nack(version, "endpoint port out of range"))
    samples = await settled(cp, "meshlet_nacks_total", 1)
    assert samples[CONVERGED] == 0

    # a newer table that the sidecar takes converges as usual
    async with cp.patch("/v1/services/svc/instances/i1", json={"weight": 7}) as r:
        assert r.status == 200
    await side.send(Ack((await side.next_table()).version))
    await settled(cp, CONVERGED, 1)


async def test_promtool_accepts_the_output(cp: Api) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool not found: apt-get install prometheus (CI's .ci/run installs it)")
    side = await connect(cp, hello(1))  # so that every metric has samples
    await side.send(Ack((await until_service(side, "svc"))[0]))
    await settled(cp, CONVERGED, 1)
    async with cp.get("/metrics") as r:
        body = await r.read()
    check = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await check.communicate(body)
    assert check.returncode == 0, output.decode()
