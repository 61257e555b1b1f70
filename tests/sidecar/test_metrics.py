"""The sidecar's /metrics: what it counts matches the traffic sent, and promtool accepts it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.sidecar.conftest import (
    LOCAL,
    NO_OUTLIER,
    Mesh,
    Upstream,
    each,
    get,
    request,
    service,
    svc,
)

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(mesh: Mesh) -> str:
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/metrics") as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain; version=")
        return await r.text()


def samples(text: str) -> Samples:
    """{(sample name, sorted labels): value}"""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool not found: apt-get install prometheus (.ci/run does)"
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stdout + done.stderr


async def test_requests_are_counted_by_service_and_status_class(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ok, busy = await upstreams("ok"), await upstreams("busy")
    services = {**svc(ok), "flaky": svc(busy, retries=0, outlier=NO_OUTLIER)["svc"]}
    mesh = await make_mesh(services)
    await each(mesh, get("/behave"), 3)
    await each(mesh, get("/behave", "flaky"), 2)
    (missing,) = await request(mesh.outbound, get("/", "nowhere"))
    assert missing.status == 404
    (broken,) = await request(
        mesh.outbound, b"GET / HTTP/1.1\r\nHost: svc\r\nContent-Length: x\r\n\r\n"
    )
    assert broken.status == 400
    text = await scrape(mesh)
    found = samples(text)
    out = {"direction": "outbound"}
    assert value(found, "meshlet_requests_total", **out, service="svc", code="2xx") == 3
    assert value(found, "meshlet_requests_total", **out, service="flaky", code="5xx") == 2
    assert value(found, "meshlet_requests_total", **out, service="", code="4xx") == 2
    count = value(found, "meshlet_request_duration_seconds_count", **out, service="svc", code="2xx")
    assert count == 3
    inf = value(
        found,
        "meshlet_request_duration_seconds_bucket",
        **out,
        service="svc",
        code="2xx",
        le="+Inf",
    )
    assert inf == 3
    assert (
        0
        < value(found, "meshlet_request_duration_seconds_sum", **out, service="svc", code="2xx")
        < 3
    )
    assert value(found, "meshlet_table_version") == 0  # a static file without a version
    assert value(found, "meshlet_upstream_connections", service="svc", state="idle") >= 1
    assert ("process_cpu_seconds_total", ()) in found
    promtool_check(text)


async def test_retries_ejections_and_endpoint_states_are_exposed(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    bad = await upstreams("busy")
    good = [await upstreams(f"ok{i}") for i in range(3)]
    mesh = await make_mesh(svc(bad, *good, outlier={"consecutive_failures": 2}))
    responses = await each(mesh, get("/behave"), 20)
    assert [r.status for r in responses] == [200] * 20
    text = await scrape(mesh)
    found = samples(text)
    retries = value(found, "meshlet_upstream_retries_total", service="svc", reason="503")
    assert retries == bad.hits == 2  # two 503s in a row, then ejected
    assert value(found, "meshlet_outlier_ejections_total", service="svc") == 1
    bad_endpoint = f"{LOCAL}:{bad.port}"
    assert (
        value(
            found, "meshlet_endpoint_state", service="svc", endpoint=bad_endpoint, state="ejected"
        )
        == 1
    )
    assert (
        value(
            found, "meshlet_endpoint_state", service="svc", endpoint=bad_endpoint, state="healthy"
        )
        == 0
    )
    good_endpoint = f"{LOCAL}:{good[0].port}"
    assert (
        value(
            found, "meshlet_endpoint_state", service="svc", endpoint=good_endpoint, state="healthy"
        )
        == 1
    )
    assert value(found, "meshlet_retries_suppressed_total", service="svc") == 0
    # per endpoint: what the outlier state does not show under peak EWMA (a failing endpoint
    # avoided on its penalty before five failures in a row) a failure rate does
    assert value(found, "meshlet_endpoint_tries_total", service="svc", endpoint=bad_endpoint) == 2
    assert (
        value(found, "meshlet_endpoint_failures_total", service="svc", endpoint=bad_endpoint) == 2
    )
    good_tries = [
        value(found, "meshlet_endpoint_tries_total", service="svc", endpoint=f"{LOCAL}:{g.port}")
        for g in good
    ]
    assert sum(good_tries) == 20
    assert (
        value(found, "meshlet_endpoint_failures_total", service="svc", endpoint=good_endpoint) == 0
    )
    promtool_check(text)


async def test_inbound_requests_count_under_the_sidecars_own_service(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    app = await upstreams("app")
    mesh = await make_mesh(svc(app), app_port=app.port)
    for _ in range(2):
        (resp,) = await request(mesh.inbound, get("/behave", "tester"))
        assert resp.status == 200
    found = samples(await scrape(mesh))
    labels = {"direction": "inbound", "service": "tester", "code": "2xx"}
    assert value(found, "meshlet_requests_total", **labels) == 2


async def test_metrics_off_is_404_and_records_nothing(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    ok = await upstreams("ok")
    mesh = await make_mesh(svc(ok), metrics="off")
    await each(mesh, get("/behave"), 2)
    async with (
        aiohttp.ClientSession() as http,
        http.get(f"http://{LOCAL}:{mesh.admin}/metrics") as r,
    ):
        assert r.status == 404
        assert "metrics are off" in (await r.json())["error"]
    assert mesh.sidecar.services.get("svc").requests is None


@pytest.mark.parametrize("endpoints", [100, 101])
async def test_per_endpoint_series_only_of_services_called_of_up_to_a_hundred_endpoints(
    make_mesh: MakeMesh, endpoints: int
) -> None:
    table = svc(*range(20000, 20000 + endpoints))
    table["never"] = service(*range(30000, 30010))
    mesh = await make_mesh(table)

    def series(found: Samples, name: str) -> dict[str, list[float]]:
        by_service: dict[str, list[float]] = {}
        for (sample, labels), v in found.items():
            if sample == name:
                by_service.setdefault(dict(labels)["service"], []).append(v)
        return by_service

    assert series(samples(await scrape(mesh)), "meshlet_endpoint_state") == {}  # none called
    (resp,) = await request(mesh.outbound, get("/"))  # (nothing listens: a refused connect)
    assert resp.status == 502
    found = samples(await scrape(mesh))
    states = series(found, "meshlet_endpoint_state")
    tries = series(found, "meshlet_endpoint_tries_total")
    if endpoints <= 100:
        assert set(states) == set(tries) == {"svc"}  # not "never": this sidecar never called it
        assert len(states["svc"]) == endpoints * 5
        assert len(tries["svc"]) == endpoints
        assert sum(tries["svc"]) >= 1  # (a refused connect is resent elsewhere: maybe more)
    else:
        assert states == tries == {}
