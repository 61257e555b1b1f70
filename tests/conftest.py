from __future__ import annotations

import itertools
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import settings

from control_plane.app import build_app
from control_plane.clock import FakeClock
from control_plane.config import ControlPlaneConfig
from control_plane.store import Store, open_store
from control_plane.store_memory import MemoryStore
from control_plane.store_sqlite import SqliteStore
from tests.netns import netns  # noqa: F401 (a fixture: a network namespace)
from tests.processes import ControlPlane, Sidecar
from tests.redis_server import RedisServer

Api = TestClient[Any, Any]
MakeApi = Callable[..., Awaitable[Api]]


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[Callable[..., ControlPlane]]:
    """Start real control-plane processes (``ControlPlane(tmp_path, *args)``); any still
    running at the end of the test are killed."""
    started: list[ControlPlane] = []

    def start(*args: str, **kwargs: Any) -> ControlPlane:
        cp = ControlPlane(tmp_path / "logs", *args, **kwargs)
        started.append(cp)
        return cp

    yield start
    for cp in started:
        cp.kill()


@pytest.fixture
def sidecar_process(tmp_path: Path) -> Iterator[Callable[..., Sidecar]]:
    """Start real sidecar processes (``Sidecar(tmp_path, *args)``); killed at the end."""
    started: list[Sidecar] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Sidecar:
        sidecar = Sidecar(tmp_path / "logs", *args, env=env)
        started.append(sidecar)
        return sidecar

    yield start
    for sidecar in started:
        sidecar.kill()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real file system of 256 KiB (a tmpfs mounted for the test): writes beyond it fail
    with ENOSPC, as on a full disk. Needs root, as the tests run here and in CI."""
    where = tmp_path / "small-disk"
    where.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(where)]
    done = subprocess.run(mount, capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        pytest.fail(f"cannot mount a small tmpfs (this test needs root): {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


def fill(disk: Path) -> None:
    """Take every byte left on ``disk``."""
    with (disk / "filler").open("ab", buffering=0) as f:
        try:
            while f.write(b"x" * 4096):
                pass
        except OSError:
            pass


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session; each store on it gets a prefix of its own
    (``redis_url``). A test that stops or restarts Redis starts its own ``RedisServer``."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


_prefixes = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """A store URL on the session's Redis that no other test shares."""
    return f"{redis_server.url}?prefix=t{next(_prefixes)}"


@pytest.fixture(params=["memory", "sqlite", "redis"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


def new_store(kind: str, path: Path, redis_url: str) -> Store:
    """A store of ``kind`` (``store_kind``); a redis one at ``redis_url``."""
    if kind == "memory":
        return MemoryStore()
    if kind == "sqlite":
        return SqliteStore(str(path / "meshlet.db"))
    return open_store(redis_url)


#: the admin token of in-process control planes (``make_api``) unless a test says otherwise
ADMIN = "test-admin-token"


@pytest.fixture
async def make_api(clock: FakeClock, tmp_path: Path) -> AsyncIterator[MakeApi]:
    """Start an in-process control plane on a free loopback port; keyword arguments go to
    ``ControlPlaneConfig`` (plus ``store=`` for a store object, SQLite in tmp_path by default).
    It runs with tokens on, as a user's should: ``admin_token`` is ``ADMIN`` unless given, and
    the client sends ``token`` (the admin token unless given; "" for none) on every call."""
    clients: list[Api] = []

    async def make(store: Store | None = None, token: str | None = None, **config: Any) -> Api:
        store = store if store is not None else SqliteStore(str(tmp_path / "meshlet.db"))
        config.setdefault("admin_token", ADMIN)
        token = config["admin_token"] if token is None else token
        app = build_app(ControlPlaneConfig(port=0, **config), clock=clock, store=store)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        client: Api = TestClient(TestServer(app), headers=headers)
        await client.start_server()
        clients.append(client)
        return client

    yield make
    for client in reversed(clients):
        await client.close()


@pytest.fixture
async def api(make_api: MakeApi) -> Api:
    return await make_api()


# Property tests must not fail because a shared CI machine was slow for a moment.
settings.register_profile("meshlet", deadline=None)
settings.load_profile("meshlet")
