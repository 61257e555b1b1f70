"""A whole mesh of real processes: a control plane, sidecars, apps, on loopback."""

from __future__ import annotations

import asyncio
import http.server
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from control_plane.wire import Nack, Welcome, decode, encode, parse_table, table_message
from tests.processes import ControlPlane, Sidecar, eventually, free_port

pytestmark = pytest.mark.slow
StartCP = Callable[..., ControlPlane]
StartSidecar = Callable[..., Sidecar]


class App:
    """A tiny app: ``/whoami`` answers its name (with status ``self.code``; ``self.hits``
    counts them), ``/healthz`` answers ``self.status``, ``/peer`` the ``x-meshlet-peer`` its
    sidecar gave it ("-": none)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.status = 200
        self.code = 200
        self.hits = 0
        app = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                code = app.status if self.path == "/healthz" else 200
                if self.path == "/whoami":
                    app.hits += 1
                    code = app.code
                body = app.name.encode() if self.path == "/whoami" else b"ok"
                if self.path == "/peer":  # the caller its sidecar verified (mesh TLS)
                    body = (self.headers.get("x-meshlet-peer") or "-").encode()
                self.send_response(code)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def apps() -> Iterator[Callable[[str], App]]:
    started: list[App] = []

    def start(name: str) -> App:
        started.append(App(name))
        return started[-1]

    yield start
    for app in started:
        app.stop()


def call(
    sidecar: Sidecar, service: str, path: str = "/whoami", headers: dict[str, str] | None = None
) -> tuple[int, str]:
    req = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.ports['outbound']}{path}",
        headers={"Host": service, **(headers or {})},
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def dump(sidecar: Sidecar) -> dict[str, Any]:
    status, data = sidecar.admin("/config_dump")
    assert status == 200
    result: dict[str, Any] = data
    return result


def endpoints(sidecar: Sidecar, service: str) -> list[int]:
    table = dump(sidecar)["table"]
    entry = (table or {}).get("services", {}).get(service)
    return sorted(e["port"] for e in entry["endpoints"]) if entry else []


def mesh_sidecar(
    start: StartSidecar,
    cp: ControlPlane | str,
    service: str,
    app: App,
    tmp: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Sidecar:
    """A sidecar of ``service`` joining ``cp`` with a token of its own, as a user's would (a
    bare URL: a control plane that is not there, or a stand-in; no token)."""
    if isinstance(cp, ControlPlane) and env is None:
        env = cp.sidecar_env(service)
    return start(
        "--service",
        service,
        "--control-plane",
        cp if isinstance(cp, str) else cp.url,
        "--app",
        f"http://127.0.0.1:{app.port}",
        "--advertise",
        "127.0.0.1",
        "--state-dir",
        str(tmp / f"state-{service}"),
        *extra,
        env=env,
    )


def quick_cp(control_plane: StartCP, tmp: Path, port: int = 0, *extra: str) -> ControlPlane:
    return control_plane(
        "--listen",
        f"127.0.0.1:{port}",
        "--store",
        f"sqlite:///{tmp}/cp.db",
        "--debounce-quiet",
        "0.05",
        *extra,
    )


def test_two_services_call_each_other_and_follow_the_registry(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> None:
    cp = quick_cp(control_plane, tmp_path)
    app_a, app_b, app_b2 = apps("a"), apps("b"), apps("b2")
    a = mesh_sidecar(sidecar_process, cp, "a", app_a, tmp_path)
    b = mesh_sidecar(sidecar_process, cp, "b", app_b, tmp_path)
    eventually(lambda: endpoints(a, "b") == [b.ports["inbound"]], what="a sees b")
    eventually(lambda: endpoints(b, "a") == [a.ports["inbound"]], what="b sees a")
    assert call(a, "b") == (200, "b")
    assert call(b, "a") == (200, "a")

    # an instance registered over REST (no sidecar) joins every caller's table (round robin:
    # peak EWMA would rightly prefer it, one hop nearer, and slow start would hold it back)
    policy = {"lb": "round_robin", "slow_start_ms": 0}
    assert cp.call("PUT", "/v1/services/b/policy", policy)[0] == 200
    body = {"id": "b2", "address": "127.0.0.1", "port": app_b2.port}
    assert cp.call("POST", "/v1/services/b/instances", body)[0] == 201
    eventually(lambda: endpoints(a, "b") == sorted([b.ports["inbound"], app_b2.port]))
    assert {call(a, "b")[1] for _ in range(6)} == {"b", "b2"}
    assert cp.call("DELETE", "/v1/services/b/instances/b2")[0] == 204
    eventually(lambda: endpoints(a, "b") == [b.ports["inbound"]])

    # kill -9 of b's sidecar: gone from a's table within a second
    b.proc.send_signal(signal.SIGKILL)
    took = eventually(lambda: endpoints(a, "b") == [], timeout=5, what="b gone")
    assert took < 1.0, f"b left a's table after {took:.2f}s"
    _, body = cp.call("GET", "/v1/services/b/instances")
    assert [i["status"] for i in body["instances"]] == ["unhealthy"]
    assert call(a, "b")[0] == 503


def test_a_sidecars_namespace_names_its_service_for_callers(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> None:
    """``--namespace``: registered with the instance, carried in callers' tables, and what
    ``SERVICE.NAMESPACE`` may name."""
    cp = quick_cp(control_plane, tmp_path)
    app_a, app_b = apps("a"), apps("b")
    a = mesh_sidecar(sidecar_process, cp, "a", app_a, tmp_path)
    b = mesh_sidecar(sidecar_process, cp, "b", app_b, tmp_path, "--namespace", "shop")
    eventually(lambda: endpoints(a, "b") == [b.ports["inbound"]], what="a sees b")
    _, body = cp.call("GET", "/v1/services/b/instances")
    assert [i["namespace"] for i in body["instances"]] == ["shop"]
    (entry,) = dump(a)["table"]["services"]["b"]["endpoints"]
    assert entry["namespace"] == "shop"
    assert call(a, "b.shop.svc.cluster.local") == (200, "b")
    assert call(a, "b.shop") == (200, "b")
    # another namespace is another host: passed through, or here (made to the sidecar
    # itself) not found
    status, text = call(a, "b.staging")
    assert status == 404
    assert "no service 'b.staging'" in text


def test_control_plane_down_restarts_and_saved_tables(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> None:
    port = free_port()
    cp = quick_cp(control_plane, tmp_path, port)
    app_a, app_b = apps("a"), apps("b")
    a = mesh_sidecar(sidecar_process, cp, "a", app_a, tmp_path)
    b = mesh_sidecar(sidecar_process, cp, "b", app_b, tmp_path)
    eventually(lambda: endpoints(a, "b") == [b.ports["inbound"]])

    # with the control plane stopped, traffic keeps flowing and the sidecars stay ready
    c_env = cp.sidecar_env("c")  # minted now: the token outlives the restart (SQLite)
    assert cp.stop() == 0
    for _ in range(5):
        assert call(a, "b") == (200, "b")
    assert a.admin("/readyz")[0] == 200
    assert dump(a)["control_plane"]["connected"] is False

    # a sidecar started now serves from the table a saved
    (tmp_path / "state-c").mkdir()
    (tmp_path / "state-c" / "c.table").write_bytes((tmp_path / "state-a" / "a.table").read_bytes())
    c = mesh_sidecar(sidecar_process, cp, "c", apps("c"), tmp_path, env=c_env)
    assert c.admin("/readyz")[0] == 200
    assert dump(c)["table"]["source"].startswith("saved:")
    assert call(c, "b") == (200, "b")

    # the control plane comes back (same file, same port): everyone converges on one version
    cp = quick_cp(control_plane, tmp_path, port)
    eventually(lambda: endpoints(a, "c") == [c.ports["inbound"]], timeout=15, what="c joins")

    def converged() -> bool:
        """One snapshot: the control plane's version is what every sidecar acked and runs (a
        sidecar's certificate can make one more version after it joined)."""
        version = cp.call("GET", "/v1/table")[1]["version"]
        sidecars = cp.call("GET", "/v1/sidecars")[1]["sidecars"]
        acked = len(sidecars) == 3 and all(s["acked_version"] == version for s in sidecars)
        return acked and {dump(s)["table"]["version"] for s in (a, b, c)} == {version}

    eventually(converged, timeout=15, what="all three sidecars ack and run the current version")

    # a sidecar killed before the next restart does not come back with it
    b.proc.send_signal(signal.SIGKILL)
    eventually(lambda: endpoints(a, "b") == [], timeout=5)
    assert cp.stop() == 0
    cp = quick_cp(control_plane, tmp_path, port)
    eventually(lambda: len(cp.call("GET", "/v1/sidecars")[1]["sidecars"]) == 2, timeout=15)
    time.sleep(0.5)
    assert endpoints(a, "b") == []
    assert [i["status"] for i in cp.call("GET", "/v1/services/b/instances")[1]["instances"]] == [
        "unhealthy"
    ]


def test_sigterm_deregisters_and_app_health_is_reported(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> None:
    cp = quick_cp(control_plane, tmp_path)
    app_a, app_b = apps("a"), apps("b")
    a = mesh_sidecar(sidecar_process, cp, "a", app_a, tmp_path)
    b = mesh_sidecar(sidecar_process, cp, "b", app_b, tmp_path, "--app-health-interval", "0.1")
    eventually(lambda: endpoints(a, "b") == [b.ports["inbound"]])

    app_b.status = 500  # three failed checks: callers stop routing to b
    eventually(lambda: endpoints(a, "b") == [], timeout=5, what="b reported unhealthy")
    app_b.status = 200  # one good check: back
    eventually(lambda: endpoints(a, "b") == [b.ports["inbound"]], timeout=5)

    assert b.stop() == 0  # SIGTERM: deregistered, not just unhealthy
    assert cp.call("GET", "/v1/services/b")[0] == 404  # its only instance is gone
    assert "deregistered b/" in b.log()


def refused_stream(sidecar: Sidecar) -> dict[str, Any]:
    """The sidecar's stream state once it says why it is not connected."""
    eventually(lambda: bool(dump(sidecar)["control_plane"]["last_error"]), what="a refusal")
    state: dict[str, Any] = dump(sidecar)["control_plane"]
    return state


def test_a_sidecar_sends_its_token_and_a_wrong_one_is_refused(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> None:
    """A control plane with a join token: the sidecar with the token (from a file) joins; one
    with a wrong token, or none, is refused and says so at /config_dump."""
    cp = control_plane(
        "--store", "memory", "--debounce-quiet", "0.05", env={"MESHLET_JOIN_TOKEN": "mesh-join"}
    )
    (tmp_path / "token").write_text("mesh-join\n")
    app = apps("a")
    good = mesh_sidecar(
        sidecar_process, cp, "a", app, tmp_path, "--token-file", str(tmp_path / "token")
    )
    wrong = sidecar_process(
        "--service", "b", "--control-plane", cp.url, "--app", f"http://127.0.0.1:{app.port}",
        "--advertise", "127.0.0.1", "--state-dir", str(tmp_path / "state-b"),
        env={"MESHLET_TOKEN": "mesh-joiN"},
    )  # fmt: skip
    none = mesh_sidecar(sidecar_process, cp, "c", app, tmp_path, env={})

    eventually(lambda: dump(good)["control_plane"]["connected"], what="the token's sidecar joins")
    assert dump(good)["control_plane"]["instance"]
    for refused in (wrong, none):
        stream = refused_stream(refused)
        assert (stream["connected"], stream["instance"]) == (False, None)
        assert stream["last_error"].startswith("the control plane refused the stream with")
        assert "token" in stream["last_error"]
    assert "control plane stream down (the control plane refused the stream" in wrong.log()


def test_a_corrupted_state_file_is_ignored_with_a_warning(
    sidecar_process: StartSidecar, apps: Callable[[str], App], tmp_path: Path
) -> None:
    (tmp_path / "state-a").mkdir()
    (tmp_path / "state-a" / "a.table").write_bytes(b"meshlet-table 1 sha256=00\n{}")
    a = mesh_sidecar(sidecar_process, f"http://127.0.0.1:{free_port()}", "a", apps("a"), tmp_path)
    assert "saved table ignored" in a.log()
    assert "checksum mismatch" in a.log()
    status, body = a.admin("/readyz")
    assert (status, body["reason"]) == (503, "no routing table loaded")


async def test_a_nacked_table_leaves_the_old_one_serving(
    sidecar_process: StartSidecar, apps: Callable[[str], App], tmp_path: Path
) -> None:
    """A stand-in control plane pushes a good table, then a bad one."""
    app_x = apps("x")
    answers: list[Any] = []
    pushed = asyncio.Event()

    async def stream(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.receive()  # hello
        await ws.send_str(encode(Welcome("x1", 0)))
        good = parse_table(
            {
                "services": {"x": {"endpoints": [{"address": "127.0.0.1", "port": app_x.port}]}},
                "version": 1,
            }
        )
        await ws.send_str(table_message(good))
        bad = {
            "type": "table",
            "version": 2,
            "services": {"x": {"endpoints": [{"address": "127.0.0.1", "port": 0}]}},
        }
        await ws.send_str(json.dumps(bad))
        async for msg in ws:
            if msg.type is WSMsgType.TEXT and decode(msg.data).__class__.__name__ in (
                "Ack",
                "Nack",
            ):
                answers.append(decode(msg.data))
                if len(answers) == 2:
                    pushed.set()
        return ws

    fake = web.Application()
    fake.router.add_get("/v1/stream", stream)
    runner = web.AppRunner(fake, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    x = mesh_sidecar(sidecar_process, url, "x", app_x, tmp_path, "--app-health", "none")
    await asyncio.wait_for(pushed.wait(), 10)
    ack, nack = answers
    assert ack.version == 1
    assert isinstance(nack, Nack)
    assert (nack.version, nack.error) == (
        2,
        "services.x.endpoints[0].port: must be from 1 to 65535; got 0",
    )
    assert (await asyncio.to_thread(dump, x))["table"]["version"] == 1
    assert await asyncio.to_thread(call, x, "x") == (200, "x")
    x.kill()  # ends the stand-in's stream handler
    await runner.cleanup()


def test_ring_hash_sends_each_user_to_one_instance_from_every_caller(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> None:
    cp = quick_cp(control_plane, tmp_path)
    policy = {"lb": "ring_hash", "hash_on": "header:x-user"}
    assert cp.call("PUT", "/v1/services/users/policy", policy)[0] == 200
    backends = [
        mesh_sidecar(sidecar_process, cp, "users", apps(f"u{i}"), tmp_path / f"u{i}")
        for i in range(5)
    ]
    callers = [
        mesh_sidecar(sidecar_process, cp, name, apps(name), tmp_path) for name in ("web", "api")
    ]
    eventually(lambda: all(len(endpoints(c, "users")) == 5 for c in callers), what="five users")

    def owners() -> dict[str, str]:
        found = {}
        for user in range(60):
            answers = {
                call(c, "users", headers={"x-user": f"user-{user}"})
                for c in callers
                for _ in range(2)
            }
            assert len(answers) == 1, (user, answers)  # every caller, every time, one instance
            ((status, name),) = answers
            assert status == 200
            found[f"user-{user}"] = name
        return found

    before = owners()
    assert len(set(before.values())) == 5
    # the control plane answers the same for every key (instance ids are ADDRESS-PORT)
    ports = [b.ports["inbound"] for b in backends]
    for user, name in before.items():
        _, owner = cp.call("GET", f"/v1/services/users/ring?key={user}")
        assert owner["instance"] == f"127.0.0.1-{ports[int(name[1:])]}"

    backends[2].proc.send_signal(signal.SIGKILL)
    eventually(lambda: all(len(endpoints(c, "users")) == 4 for c in callers), what="u2 gone")
    after = owners()
    for user, name in before.items():
        if name == "u2":
            assert after[user] != "u2"
        else:
            assert after[user] == name, f"{user} moved from {name} to {after[user]}"


def test_peak_ewma_keeps_traffic_off_an_instance_that_fails_fast(
    control_plane: StartCP,
    sidecar_process: StartSidecar,
    apps: Callable[[str], App],
    tmp_path: Path,
) -> None:
    cp = quick_cp(control_plane, tmp_path)
    assert cp.call("PUT", "/v1/services/flaky/policy", {"retries": 0})[0] == 200
    backends = [apps(f"f{i}") for i in range(4)]
    backends[0].code = 503  # answers at once, always 503
    for i, app in enumerate(backends):
        mesh_sidecar(sidecar_process, cp, "flaky", app, tmp_path / f"f{i}")
    caller = mesh_sidecar(sidecar_process, cp, "web", apps("web"), tmp_path)
    eventually(lambda: len(endpoints(caller, "flaky")) == 4, what="four flaky")
    statuses = [call(caller, "flaky")[0] for _ in range(400)]
    bad = backends[0].hits / sum(a.hits for a in backends)
    assert bad < 0.05, f"{backends[0].hits} of 400 went to the failing instance"
    assert statuses.count(503) == backends[0].hits  # no retries: each of its answers shows
