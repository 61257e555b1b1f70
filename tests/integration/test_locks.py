"""Locks for apps with real processes (issue 14): a control plane on SQLite or Redis (and three
replicas on Redis), sidecars, and ``meshlet.locks`` clients in this process writing to a
resource that checks fencing tokens."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from meshlet import locks
from tests.processes import ControlPlane, Sidecar, eventually, free_port, http
from tests.redis_server import RedisServer


@dataclass
class FencedResource:
    """What a lock guards, as the README says to build it: a write carries its fencing token
    and is refused when a higher token has written already. It also records what no client
    should ever see: two writers inside at once."""

    highest: int = 0
    writes: list[tuple[int, str]] = field(default_factory=list)
    refused: list[tuple[int, str]] = field(default_factory=list)
    inside: int = 0
    most_inside: int = 0

    def write(self, token: int, value: str) -> bool:
        if token < self.highest:
            self.refused.append((token, value))
            return False
        self.highest = token
        self.writes.append((token, value))
        return True

    async def critical_section(self, token: int, value: str) -> None:
        self.inside += 1
        self.most_inside = max(self.most_inside, self.inside)
        try:
            assert self.write(token, f"{value}:begin")
            await asyncio.sleep(0.005)  # others run meanwhile: they must be waiting
            assert self.write(token, f"{value}:end")
        finally:
            self.inside -= 1


@pytest.fixture(params=["sqlite", "redis"])
def cp(
    control_plane: Callable[..., ControlPlane], tmp_path: Path, request: pytest.FixtureRequest
) -> ControlPlane:
    """A control plane on SQLite, or a replica on the session's Redis."""
    if request.param == "redis":
        return control_plane("--store", request.getfixturevalue("redis_url"))
    return control_plane("--store", f"sqlite:///{tmp_path}/cp.db")


@pytest.fixture
def admin(cp: ControlPlane, sidecar_process: Callable[..., Sidecar], tmp_path: Path) -> str:
    """The admin URL of a sidecar of service ``orders``, with a token of its own."""
    sidecar = sidecar_process(
        "--service", "orders", "--control-plane", cp.url, "--app", "http://127.0.0.1:9",
        "--app-health", "none", "--advertise", "127.0.0.1", "--state-dir", str(tmp_path / "s"),
        env=cp.sidecar_env("orders"),
    )  # fmt: skip
    return f"http://127.0.0.1:{sidecar.ports['admin']}"


async def test_fifty_clients_never_hold_one_name_at_once(cp: ControlPlane, admin: str) -> None:
    resource = FencedResource()
    tokens: list[int] = []

    async def client(n: int, http: aiohttp.ClientSession) -> None:
        async with locks.hold("orders", ttl=5.0, wait=50.0, admin=admin, session=http) as lock:
            tokens.append(lock.token)
            await resource.critical_section(lock.token, f"client-{n}")
            assert not lock.lost.is_set()

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(n, http) for n in range(50)))
    assert resource.most_inside == 1
    assert resource.refused == []
    assert len(resource.writes) == 100
    assert tokens == sorted(tokens)
    assert len(set(tokens)) == 50  # one lease each, each fenced above the one before
    async with aiohttp.ClientSession() as http, http.get(f"{cp.url}/metrics") as r:
        metrics = await r.text()
    assert "meshlet_lock_acquisitions_total 50.0" in metrics
    assert "meshlet_lock_releases_total 50.0" in metrics


async def test_expiry_hands_the_lock_on_and_the_paused_holders_write_is_refused(
    admin: str,
) -> None:
    resource = FencedResource()
    async with locks.hold("orders", ttl=0.3, renew=False, admin=admin) as paused:
        assert resource.write(paused.token, "paused:1")
        await asyncio.sleep(0.6)  # paused past its lease: it does not know yet
        async with locks.hold("orders", ttl=5.0, wait=0.0, admin=admin) as taker:
            assert taker.token > paused.token  # the lease ended, so it was free
            assert resource.write(taker.token, "taker")
        assert not resource.write(paused.token, "paused:2")  # the token check refuses it
    assert resource.refused == [(paused.token, "paused:2")]
    assert paused.lost.is_set()  # its release on exit was refused: it learns it


async def test_a_holder_whose_renewals_stall_learns_it_lost_the_lock(
    cp: ControlPlane, admin: str
) -> None:
    """The control plane stops (SIGSTOP) past the holder's lease: its renewals get no answer,
    so it flags ``lost`` when the lease would end; the next holder is fenced above it."""
    resource = FencedResource()
    async with locks.hold("orders", ttl=0.6, admin=admin) as holder:
        assert resource.write(holder.token, "holder:1")
        await asyncio.sleep(0.3)
        assert holder.renewals >= 1
        cp.proc.send_signal(signal.SIGSTOP)
        try:
            await asyncio.wait_for(holder.lost.wait(), 2.0)
        finally:
            cp.proc.send_signal(signal.SIGCONT)
        async with locks.hold("orders", ttl=5.0, wait=5.0, admin=admin) as next_holder:
            assert next_holder.token > holder.token
            assert resource.write(next_holder.token, "next")
        assert not resource.write(holder.token, "holder:2")


async def test_a_held_name_is_refused_after_wait_and_names_are_per_service(
    cp: ControlPlane, admin: str
) -> None:
    async with locks.hold("orders", ttl=5.0, admin=admin):
        with pytest.raises(locks.LockHeld, match="lock orders is held"):
            async with locks.hold("orders", wait=0.2, admin=admin):
                pass
        # another service's lock of the same name is another lock
        status, other = cp.call("POST", "/v1/services/billing/locks/orders", {"ttl_ms": 1000})
        assert status == 200
        assert other["shared"] is False
    with pytest.raises(locks.LockError) as bad:
        async with locks.hold("orders", ttl=0.01, admin=admin):
            pass
    assert (bad.value.status, bad.value.field) == (400, "ttl_ms")
    assert str(bad.value) == "400 (ttl_ms): must be from 100 to 600000 milliseconds; got 10"


def test_fences_survive_a_control_plane_restart(
    control_plane: Callable[..., ControlPlane], tmp_path: Path
) -> None:
    store = f"sqlite:///{tmp_path}/cp.db"
    first = control_plane("--store", store)
    path = "/v1/services/orders/locks/orders"
    status, before = first.call("POST", path, {"ttl_ms": 100})
    assert status == 200
    assert first.stop() == 0
    second = control_plane("--store", store)
    status, after = second.call("POST", path, {"ttl_ms": 1000, "wait_ms": 5000})
    assert status == 200
    assert after["token"] > before["token"]
    status, _ = second.call("PUT", path + "/renew", {"token": before["token"], "ttl_ms": 100})
    assert status == 409


def test_locks_reach_an_https_control_plane_verified_with_the_ca_file(
    control_plane: Callable[..., ControlPlane],
    sidecar_process: Callable[..., Sidecar],
    tmp_path: Path,
) -> None:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(
        str(tmp_path / "server.pem")
    )
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    trustme.CA().cert_pem.write_to_path(str(tmp_path / "other-ca.pem"))
    server = str(tmp_path / "server.pem")
    cp = control_plane(
        "--store", "memory", "--tls-cert", server, "--tls-key", server,
        ca_file=str(tmp_path / "ca.pem"),
    )  # fmt: skip
    common = ("--service", "orders", "--control-plane", cp.url, "--app", "http://127.0.0.1:9",
              "--app-health", "none", "--advertise", "127.0.0.1")  # fmt: skip
    answers = []
    for name, ca_file in (("good", "ca.pem"), ("bad", "other-ca.pem")):
        sidecar = sidecar_process(
            *common, "--state-dir", str(tmp_path / name), "--ca-file", str(tmp_path / ca_file),
            env=cp.sidecar_env("orders"),
        )  # fmt: skip
        url = f"http://127.0.0.1:{sidecar.ports['admin']}/v1/locks/{name}"
        answers.append(http("POST", url, {"ttl_ms": 1000}))
    (good_status, good), (bad_status, bad) = answers
    assert (good_status, good["name"], good["token"] >= 1) == (200, "good", True)
    assert bad_status == 503
    assert "CERTIFICATE_VERIFY_FAILED" in bad["error"]


async def test_fifty_clients_through_three_replicas_on_redis_never_hold_one_name_at_once(
    control_plane: Callable[..., ControlPlane],
    sidecar_process: Callable[..., Sidecar],
    tmp_path: Path,
) -> None:
    """Three control-plane replicas on one Redis, a sidecar on each: the clients of each
    sidecar ask a different replica, and the lock is still one; a replica killed on the way
    does not hand out a token twice."""
    redis = RedisServer(tmp_path / "redis", persist=True)
    try:
        store = f"{redis.url}?prefix=locks"
        cps = [control_plane("--store", store) for _ in range(3)]
        admins = []
        for n, cp in enumerate(cps):
            sidecar = sidecar_process(
                "--service", "orders", "--control-plane", cp.url, "--app",
                "http://127.0.0.1:9", "--app-health", "none", "--advertise", f"127.0.0.{n + 1}",
                "--state-dir", str(tmp_path / f"s{n}"), env=cps[0].sidecar_env("orders"),
            )  # fmt: skip
            admins.append(f"http://127.0.0.1:{sidecar.ports['admin']}")
        resource = FencedResource()
        tokens: list[int] = []

        async def client(n: int, http: aiohttp.ClientSession) -> None:
            admin = admins[n % 3]
            async with locks.hold("orders", ttl=5.0, wait=50.0, admin=admin, session=http) as lock:
                tokens.append(lock.token)
                await resource.critical_section(lock.token, f"client-{n}")

        async with aiohttp.ClientSession() as http:
            await asyncio.gather(*(client(n, http) for n in range(50)))
        assert resource.most_inside == 1
        assert resource.refused == []
        assert len(set(tokens)) == 50
        assert tokens == sorted(tokens)  # each later holder fenced above the one before

        cps[0].kill()  # the fence lives in Redis: a replica's death takes none of it
        async with locks.hold("orders", ttl=5.0, admin=admins[1]) as lock:
            assert lock.token > max(tokens)
    finally:
        redis.stop()


async def test_a_sidecar_with_several_control_planes_takes_locks_through_a_live_one(
    control_plane: Callable[..., ControlPlane],
    sidecar_process: Callable[..., Sidecar],
    tmp_path: Path,
    redis_url: str,
) -> None:
    """Its calls go to the replica its stream is on, and to the next one it can reach when
    that one is gone (a dead address in the list is passed over)."""
    cps = [control_plane("--store", redis_url) for _ in range(2)]
    dead = f"http://127.0.0.1:{free_port()}"
    sidecar = sidecar_process(
        "--service", "orders", "--control-plane", f"{dead},{cps[0].url},{cps[1].url}",
        "--app", "http://127.0.0.1:9", "--app-health", "none", "--advertise", "127.0.0.1",
        "--state-dir", str(tmp_path / "s"), env=cps[0].sidecar_env("orders"),
    )  # fmt: skip
    admin = f"http://127.0.0.1:{sidecar.ports['admin']}"
    async with locks.hold("orders", ttl=5.0, admin=admin) as first:
        pass

    def stream_on() -> Any:
        return http("GET", f"{admin}/config_dump")[1]["control_plane"]["connected_to"]

    eventually(lambda: stream_on() is not None, what="the stream is up")
    (on,) = [cp for cp in cps if cp.url == stream_on()["url"]]
    on.kill()
    async with locks.hold("orders", ttl=5.0, wait=5.0, admin=admin) as second:
        assert second.token > first.token
