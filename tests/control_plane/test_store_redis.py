"""What only the Redis store does: its URL, password, TLS, and a Redis that is down or hung.
The store contract itself runs in test_store_contract over every store."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis
import trustme

from control_plane.errors import ConfigError, StoreError
from control_plane.model import InstanceRecord
from control_plane.store import open_store
from control_plane.store_redis import PASSWORD_ENV, PASSWORD_FILE_ENV, RedisStore
from tests.redis_server import RedisServer


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("redis://user:secret@127.0.0.1:6379/0", "no credentials in the redis URL"),
        ("redis://:secret@127.0.0.1:6379/0", "MESHLET_REDIS_PASSWORD"),
        ("redis:///0", "needs a host"),
        ("redis://127.0.0.1:99999/0", "bad port"),
        ("redis://127.0.0.1:6379/zero", "database must be a number: 'zero'"),
        ("redis://127.0.0.1:6379/0?db=2", "unknown redis URL parameter 'db'"),
        ("redis://127.0.0.1:6379/0?prefix=a%20b", "prefix must be"),
        ("redis://127.0.0.1:6379/0?prefix=", "prefix must be"),
        ("redis://127.0.0.1:6379/0?ssl_ca_certs=/ca.pem", "verifies a rediss://"),
    ],
)
def test_a_bad_redis_url_is_refused_naming_what_is_wrong(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match="store") as refused:
        open_store(url)
    assert complaint in str(refused.value)
    assert "secret" not in str(refused.value)


def test_a_redis_url_names_server_database_and_prefix() -> None:
    store = open_store("rediss://redis.example:6380/3?prefix=mesh-a&ssl_ca_certs=/etc/ca.pem")
    assert isinstance(store, RedisStore)
    assert (store.url, store.prefix) == ("rediss://redis.example:6380/3", "mesh-a:")
    assert isinstance(open_store("redis://127.0.0.1"), RedisStore)  # db 0, prefix meshlet:


async def test_keys_are_kept_under_the_prefix(redis_server: RedisServer) -> None:
    store = open_store(f"{redis_server.url}?prefix=prefixed")
    await store.put_instance(InstanceRecord("a", "i1", "10.0.0.1", 80))
    await store.close()
    client = redis.Redis(port=redis_server.port, decode_responses=True)
    assert set(client.keys("prefixed:*")) == {"prefixed:instances", "prefixed:changes"}
    assert client.hkeys("prefixed:instances") == ["a/i1"]
    client.close()


async def test_the_password_comes_from_the_environment_or_a_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = RedisServer(tmp_path / "redis", "--requirepass", "s3cret")
    try:
        url = f"{server.url}?prefix=p"
        store = open_store(url)  # no password
        with pytest.raises(StoreError, match="Authentication required"):
            await store.load()
        await store.close()

        monkeypatch.setenv(PASSWORD_ENV, "s3cret")
        store = open_store(url)
        assert (await store.load()).epoch
        await store.close()

        (tmp_path / "password").write_text("s3cret\n")  # as a mounted secret may end
        monkeypatch.delenv(PASSWORD_ENV)
        monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "password"))
        store = open_store(url)
        assert (await store.load()).epoch
        await store.close()

        monkeypatch.setenv(PASSWORD_FILE_ENV, str(tmp_path / "missing"))
        with pytest.raises(ConfigError, match="cannot read MESHLET_REDIS_PASSWORD_FILE"):
            open_store(url)
        monkeypatch.setenv(PASSWORD_ENV, "s3cret")
        with pytest.raises(ConfigError, match="not both"):
            open_store(url)
    finally:
        server.stop()


async def test_rediss_verifies_the_server_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_pem.write_to_path(tmp_path / "key.pem")
    cert.cert_chain_pems[0].write_to_path(tmp_path / "cert.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    other = trustme.CA()
    other.cert_pem.write_to_path(tmp_path / "other-ca.pem")
    server = RedisServer(tmp_path / "redis", tls=tmp_path)
    try:
        url = f"{server.url}?prefix=tls"
        store = open_store(f"{url}&ssl_ca_certs={tmp_path / 'ca.pem'}")
        await store.put_instance(InstanceRecord("a", "i1", "10.0.0.1", 80))
        assert [r.key for r in (await store.load()).instances] == [("a", "i1")]
        await store.close()

        store = open_store(f"{url}&ssl_ca_certs={tmp_path / 'other-ca.pem'}")
        with pytest.raises(StoreError, match="certificate verify failed"):
            await store.load()
        await store.close()
    finally:
        server.stop()


async def test_a_redis_that_is_down_or_hung_fails_calls_within_the_timeout(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis")
    store = open_store(f"{server.url}?prefix=gone")
    await store.load()
    server.pause()  # connections stay open; nothing answers
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"redis redis://127.0.0.1:{server.port}/0: "):
        await store.put_instance(InstanceRecord("a", "i1", "10.0.0.1", 80))
    assert time.monotonic() - start < 5
    server.resume()
    server.stop()
    start = time.monotonic()
    with pytest.raises(StoreError, match="redis"):
        await store.probe()
    assert time.monotonic() - start < 5
    server.start()  # empty again: it kept nothing on disk
    try:
        await store.probe()  # the same store object recovers by itself
    finally:
        await store.close()
        server.stop()


async def test_an_invalid_stored_record_is_named(redis_server: RedisServer) -> None:
    client = redis.Redis(port=redis_server.port)
    client.hset("broken:instances", "svc/i1", '{"address": "10.0.0.1"}')
    client.hset("broken2:policies", "svc", '{"lb": "bogus"}')
    client.close()
    store = open_store(f"{redis_server.url}?prefix=broken")
    with pytest.raises(StoreError, match="stored instance 'svc/i1' is invalid"):
        await store.load()
    await store.close()
    store = open_store(f"{redis_server.url}?prefix=broken2")
    with pytest.raises(StoreError, match="stored policy of 'svc' is invalid: lb"):
        await store.load()
    await store.close()
