"""``meshlet demo --ha`` finds its Redis: the one named, else the default address, else a
private redis-server it says it started; and it removes its own keys, and only those."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import redis.asyncio as aioredis

from meshlet import demo_ha
from tests.processes import free_port
from tests.redis_server import RedisServer

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


async def test_the_named_redis_is_used_and_only_the_demos_keys_are_removed(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    said: list[str] = []
    found = await demo_ha.connect(redis_server.url, tmp_path, said.append)
    other = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert said == []
        assert found.server is None
        assert found.prefix.startswith("meshlet-demo-")
        assert found.store == f"{redis_server.url}?prefix={found.prefix}"
        await other.set(f"{found.prefix}:meta", "1")
        await other.hset(f"{found.prefix}:instances", "a/1", "{}")
        await other.set("someone-else:meta", "kept")
        await other.set(f"{found.prefix}x:meta", "kept too")  # another prefix that starts alike
        assert await found.erase() == 2
        assert await other.get("someone-else:meta") == "kept"
        assert await other.get(f"{found.prefix}x:meta") == "kept too"
        assert await other.exists(f"{found.prefix}:meta", f"{found.prefix}:instances") == 0
    finally:
        await other.delete("someone-else:meta", f"{found.prefix}x:meta")
        await other.aclose()
        await found.close()


async def test_nothing_at_the_default_address_starts_a_private_redis_server_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    monkeypatch.setattr(demo_ha, "DEFAULT_REDIS", nowhere)
    (tmp_path / "logs").mkdir()
    said: list[str] = []
    found = await demo_ha.connect(None, tmp_path, said.append)
    try:
        assert found.server is not None
        (line,) = said
        assert f"nothing answers at {nowhere}" in line
        assert f"started a private redis-server for this run at {found.url}" in line
        assert f"pid {found.server.pid}" in line
        assert found.url != nowhere
        assert await found.client.ping()
    finally:
        await found.close()
    assert found.server is not None
    assert not found.server.alive
    with pytest.raises(ProcessLookupError):
        os.kill(found.server.pid, 0)


async def test_a_named_redis_that_does_not_answer_is_an_error_not_a_private_one(
    tmp_path: Path,
) -> None:
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(demo_ha.NoRedis, match="does not answer") as caught:
        await demo_ha.connect(nowhere, tmp_path, print)
    assert "apt-get install redis-server" in str(caught.value)
    assert not (tmp_path / "redis").exists()


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("redis://127.0.0.1:6379/0?prefix=mine", "leave out ?prefix="),
        ("redis://user:pw@127.0.0.1:6379/0", "put no credentials in the redis URL"),
        ("redis://127.0.0.1:6379/zero", "the redis database must be a number"),
        ("http://127.0.0.1:6379/0", "redis"),
    ],
)
async def test_a_bad_redis_url_is_named(url: str, why: str, tmp_path: Path) -> None:
    with pytest.raises(demo_ha.NoRedis, match=r"^--redis: ") as caught:
        await demo_ha.connect(url, tmp_path, print)
    assert why in str(caught.value)
