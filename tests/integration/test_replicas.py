"""Three control-plane replicas on one real Redis, with real sidecars and traffic: a leader
killed or paused, Redis restarted, a replica killed under load."""

from __future__ import annotations

import re
import signal
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.test_mesh import App, StartCP, StartSidecar, call, dump, mesh_sidecar
from tests.processes import ControlPlane, Sidecar, eventually
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

LEASE_TTL = 2.0
HEARTBEAT_TTL = 8.0  # sidecars heartbeat every 5 s
REMOVE_AFTER = 12.0


@dataclass
class Mesh:
    redis: RedisServer
    cps: list[ControlPlane]
    a: Sidecar
    b: Sidecar

    def metric(self, cp: ControlPlane, name: str) -> float:
        with urllib.request.urlopen(f"{cp.url}/metrics", timeout=5) as r:
            found = re.search(rf"^{name} (\S+)$", r.read().decode(), re.M)
        assert found, name
        return float(found.group(1))

    def leaders(self) -> list[ControlPlane]:
        return [cp for cp in self.live() if self.metric(cp, "meshlet_replica_reaper") == 1]

    def live(self) -> list[ControlPlane]:
        return [cp for cp in self.cps if cp.proc.poll() is None]

    def instances(self, cp: ControlPlane) -> dict[str, str]:
        """instance id -> status, of every service, as ``cp`` has them."""
        status, body = cp.call("GET", "/v1/services")
        assert status == 200, body
        found: dict[str, str] = {}
        for service in body["services"]:
            status, detail = cp.call("GET", f"/v1/services/{service['name']}")
            if status == 404:  # gone since the list
                continue
            found |= {f"{service['name']}/{i['id']}": i["status"] for i in detail["instances"]}
        return found

    def on(self, sidecar: Sidecar) -> ControlPlane | None:
        """The replica the sidecar's stream is on (None: between two)."""
        connected = dump(sidecar)["control_plane"]["connected_to"]
        return next(cp for cp in self.cps if cp.url == connected["url"]) if connected else None


@pytest.fixture
def mesh(control_plane: StartCP, sidecar_process: StartSidecar, tmp_path: Path) -> Iterator[Mesh]:
    redis = RedisServer(tmp_path / "redis", persist=True)
    apps = [App("a"), App("b")]
    try:
        store = f"{redis.url}?prefix=ha"
        cps = [
            control_plane(
                "--store",
                store,
                "--debounce-quiet",
                "0.05",
                "--heartbeat-ttl",
                str(HEARTBEAT_TTL),
                "--remove-after",
                str(REMOVE_AFTER),
                "--lease-ttl",
                str(LEASE_TTL),
            )
            for _ in range(3)
        ]
        urls = ",".join(cp.url for cp in cps)
        # tokens minted on one replica work on every one
        a = mesh_sidecar(sidecar_process, urls, "a", apps[0], tmp_path, env=cps[0].sidecar_env("a"))
        b = mesh_sidecar(sidecar_process, urls, "b", apps[1], tmp_path, env=cps[1].sidecar_env("b"))
        mesh = Mesh(redis, cps, a, b)
        eventually(lambda: call(b, "a") == (200, "a"), what="b reaches a through the mesh")
        eventually(lambda: len(mesh.leaders()) == 1, what="one reaper")
        yield mesh
    finally:
        for app in apps:
            app.stop()
        redis.stop()


def versions(mesh: Mesh) -> dict[str, int]:
    """Table version of every live replica and every sidecar, by who holds it."""
    found = {f"replica {cp.url}": cp.call("GET", "/v1/table")[1]["version"] for cp in mesh.live()}
    sidecars = {"sidecar a": mesh.a, "sidecar b": mesh.b}
    return found | {name: dump(s)["table"]["version"] for name, s in sidecars.items()}


def one_version(mesh: Mesh, timeout: float) -> None:
    held: dict[str, int] = {}

    def same() -> bool:
        held.update(versions(mesh))
        return len(set(held.values())) == 1

    try:
        eventually(same, timeout=timeout, what="one version everywhere")
    except AssertionError as e:
        raise AssertionError(f"{e}; last seen {held}") from None


def test_the_leader_killed_another_reaps_within_the_lease_ttl(mesh: Mesh) -> None:
    (leader,) = mesh.leaders()
    leader.kill()
    killed = time.monotonic()
    eventually(lambda: len(mesh.leaders()) == 1, timeout=LEASE_TTL + 3, what="a new reaper")
    took = time.monotonic() - killed
    assert took < LEASE_TTL + 1.0, f"{took:.2f} s to take over"
    # expiry resumes: an instance that never heartbeats goes
    survivor = mesh.live()[0]
    status, _ = survivor.call(
        "POST", "/v1/services/ghost/instances", {"id": "g1", "address": "10.9.9.9", "port": 80}
    )
    assert status == 201
    eventually(
        lambda: "ghost/g1" not in mesh.instances(survivor),
        timeout=REMOVE_AFTER + 4,
        what="the silent instance removed",
    )
    for cp in mesh.live():
        found = mesh.instances(cp)
        assert sorted(key.split("/")[0] for key in found) == ["a", "b"]
        assert set(found.values()) == {"healthy"}
    print(f"a new reaper {took * 1000:.0f} ms after kill -9 (lease TTL {LEASE_TTL:.0f} s)")


def test_a_leader_paused_past_its_lease_expires_nothing_when_it_resumes(mesh: Mesh) -> None:
    """SIGSTOP past its lease, then SIGCONT: its overdue sweeps, judged on clocks that jumped,
    must write nothing (the fence refuses them). Instances whose sidecars' streams were on it
    lose their heartbeats meanwhile and may turn unhealthy (as behind any hung control plane),
    but none is removed, and all are healthy again once it runs."""
    (leader,) = mesh.leaders()
    others = [cp for cp in mesh.cps if cp is not leader]
    before = set(mesh.instances(others[0]))
    leader.proc.send_signal(signal.SIGSTOP)
    try:
        eventually(
            lambda: any(mesh.metric(cp, "meshlet_replica_reaper") == 1 for cp in others),
            timeout=LEASE_TTL + 3,
            what="another reaper while the first is stopped",
        )
        # by its own clocks, every instance will be past its TTL when it resumes
        paused_until = time.monotonic() + HEARTBEAT_TTL + 1
        while time.monotonic() < paused_until:
            for cp in others:
                assert set(mesh.instances(cp)) == before
            time.sleep(0.5)
    finally:
        leader.proc.send_signal(signal.SIGCONT)

    def all_healthy() -> bool:
        found = [mesh.instances(cp) for cp in mesh.cps]
        return all(set(f) == before and set(f.values()) == {"healthy"} for f in found)

    eventually(all_healthy, timeout=8, what="every instance healthy on every replica")
    assert len(mesh.leaders()) == 1
    assert mesh.metric(leader, "meshlet_replica_reaper") == 0
    one_version(mesh, timeout=5)
    assert call(mesh.b, "a") == (200, "a")


def test_redis_restarted_nothing_expires_and_everyone_converges(mesh: Mesh) -> None:
    # from a settled mesh: an earlier test's stopped or killed replica can leave an instance
    # unhealthy for a heartbeat or two (one CI run took its "before" then)
    eventually(
        lambda: all(set(mesh.instances(cp).values()) == {"healthy"} for cp in mesh.cps),
        timeout=10,
        what="every instance healthy on every replica",
    )
    before = mesh.instances(mesh.cps[0])
    mesh.redis.stop()
    down = time.monotonic()
    eventually(lambda: not mesh.leaders(), timeout=LEASE_TTL + 3, what="no reaper without Redis")
    status, body = mesh.cps[0].call("PUT", "/v1/services/a/policy", {"lb": "random"})
    assert status == 503, body
    assert call(mesh.b, "a") == (200, "a")  # the data path does not need the control plane
    time.sleep(max(0.0, REMOVE_AFTER + 1 - (time.monotonic() - down)))  # past remove_after
    mesh.redis.start()
    eventually(lambda: len(mesh.leaders()) == 1, timeout=10, what="a reaper again")
    status, body = mesh.cps[2].call("PUT", "/v1/services/a/policy", {"lb": "random"})
    assert status == 200, body
    one_version(mesh, timeout=10)
    for cp in mesh.cps:
        assert mesh.instances(cp) == before
    assert call(mesh.b, "a") == (200, "a")


def test_a_replica_killed_under_load_fails_no_request(mesh: Mesh) -> None:
    results: Counter[int] = Counter()
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline and sum(results.values()) < 20_000:
            results[call(mesh.b, "a")[0]] += 1

    worker = threading.Thread(target=load)
    worker.start()
    try:
        time.sleep(1)
        victim = mesh.on(mesh.a)
        assert victim is not None
        victim.kill()
        killed = time.monotonic()
        eventually(lambda: mesh.on(mesh.a) not in (None, victim), timeout=5, what="a moved")
        moved = time.monotonic() - killed
        eventually(lambda: mesh.on(mesh.b) not in (None, victim), timeout=5, what="b on a live one")
        time.sleep(2)
    finally:
        stop.set()
        worker.join()
    assert results[200] > 100
    assert set(results) == {200}, results
    survivor = mesh.live()[0]
    status, body = survivor.call("GET", "/v1/sidecars")
    assert status == 200
    assert {s["service"] for s in body["sidecars"]} == {"a", "b"}
    assert all(s["replica"] for s in body["sidecars"])  # every one says where it is
    print(f"a moved {moved * 1000:.0f} ms after kill -9; {results[200]} requests, 0 failed")


def test_a_replica_stops_on_sigterm_while_its_redis_calls_are_in_flight(
    control_plane: StartCP, tmp_path: Path
) -> None:
    """redis-py can swallow the cancellation of a task whose command is in flight: a replica
    is nearly always in one (its follower blocks in XREAD), and used to hang on SIGTERM."""
    redis = RedisServer(tmp_path / "redis")
    try:
        for n in range(4):
            cp = control_plane("--store", f"{redis.url}?prefix=stop", "--debounce-quiet", "0.01")
            for i in range(20):  # the publisher and the followers busy too
                body = {"id": f"i{i}", "address": f"10.0.0.{i + 1}", "port": 80 + n}
                assert cp.call("POST", "/v1/services/s/instances", body)[0] in (200, 201)
            started = time.monotonic()
            assert cp.stop(timeout=15) == 0, cp.log()
            assert time.monotonic() - started < 12, f"stop {n} took too long"
            assert "did not stop" not in cp.log()
    finally:
        redis.stop()
