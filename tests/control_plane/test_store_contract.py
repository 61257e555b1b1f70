"""One contract for every Store, checked against a model by a hypothesis state machine."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import tempfile
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from control_plane.clock import FakeClock
from control_plane.errors import ConfigError, StoreError
from control_plane.locks import LockGrant
from control_plane.model import InstanceRecord, Origin, TokenRecord
from control_plane.store import Snapshot, Store, open_store
from control_plane.store_memory import MemoryStore
from control_plane.store_sqlite import SqliteStore
from control_plane.wire import Hedge, Policy, RetryBudget
from tests.conftest import new_store
from tests.redis_server import RedisServer

T = TypeVar("T")

services = st.sampled_from(["a", "b", "cat-1"])
ids = st.sampled_from(["i1", "i2", "10.0.0.1-80"])
records = st.builds(
    InstanceRecord,
    service=services,
    id=ids,
    address=st.sampled_from(["10.0.0.1", "::1", "host.example"]),
    port=st.integers(1, 65535),
    zone=st.sampled_from(["", "a", "us-east-1a"]),
    weight=st.integers(1, 10_000),
    metadata=st.dictionaries(st.sampled_from(["v", "team"]), st.text(max_size=5), max_size=2),
    draining=st.booleans(),
    origin=st.sampled_from(list(Origin)),
    tls=st.booleans(),
)
cas = st.sampled_from([("cert-a", "key-a"), ("cert-b", "key-b")])
fingerprints = st.sampled_from(["f1", "f2", "f3"])
roots = st.none() | st.tuples(fingerprints, st.sampled_from(["pem-1", "pem-2"]))
token_ids = st.sampled_from(["t1", "t2", "t3"])
lock_keys = st.sampled_from(["a/orders", "b/orders", "*/shared"])
ttls = st.integers(1, 3_000)
grant_names = st.sampled_from(["shared", "jobs", "x.y-z"])
tokens = st.builds(
    TokenRecord,
    id=token_ids,
    service=services,
    description=st.text(max_size=10),
    digest=st.text(alphabet="0123456789abcdef", min_size=64, max_size=64),
    created=st.floats(1e9, 2e9),
)
hash_policies = st.builds(
    Policy,
    lb=st.sampled_from(["ring_hash", "maglev"]),
    hash_on=st.sampled_from(["header:x-user", "cookie:s", "query:q", "path", "source_ip"]),
    hash_balance_factor=st.floats(1, 100),
)
policies = (
    st.builds(
        Policy,
        lb=st.sampled_from(["round_robin", "least_request", "peak_ewma", "random"]),
        retries=st.integers(0, 10),
        retry_on=st.lists(
            st.sampled_from(["connect-failure", "reset", 429, 500, 503, "unavailable"]), unique=True
        ).map(tuple),
        retry_budget=st.builds(RetryBudget, ratio=st.floats(0, 1), min_per_s=st.integers(0, 50)),
        zone_aware=st.booleans(),
        hedge=st.none() | st.builds(Hedge, after_ms=st.integers(1, 14_999)),
    )
    | hash_policies
)


class StoreContract(RuleBasedStateMachine):
    """``make`` opens a store on ``path`` reading time from ``clock``; a durable store must
    give back, after a reopen, exactly what was acknowledged. Leases end on the clock's
    monotonic time, or its wall-clock time (``wall``) for a store whose leases outlive it."""

    make: Callable[[Path, FakeClock], Store]
    durable: bool
    wall: bool

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.dir = tempfile.TemporaryDirectory()
        self.path = Path(self.dir.name)
        self.clock = FakeClock()
        self.store = type(self).make(self.path, self.clock)
        self.leases: dict[str, tuple[int, float]] = {}
        """key -> (token, when its lease ends) as acknowledged"""
        self.highest: dict[str, int] = {}
        """key -> the highest token handed out for it"""
        self.grants: dict[str, frozenset[str]] = {}
        self.policies: dict[str, Policy] = {}
        self.instances: dict[tuple[str, str], InstanceRecord] = {}
        self.table: tuple[int, str, frozenset[tuple[str, str]]] = (0, "", frozenset())
        self.epoch = ""
        self.tokens: dict[str, TokenRecord] = {}
        self.ca: tuple[str, str] | None = None
        self.roots: dict[str, str] = {}

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    @rule(service=services, policy=policies)
    def put_policy(self, service: str, policy: Policy) -> None:
        self.run(self.store.put_policy(service, policy))
        self.policies[service] = policy

    @rule(service=services)
    def delete_policy(self, service: str) -> None:
        self.run(self.store.delete_policy(service))
        self.policies.pop(service, None)

    @rule(record=records)
    def put_instance(self, record: InstanceRecord) -> None:
        self.run(self.store.put_instance(record))
        self.instances[record.key] = record

    @rule(keys=st.lists(st.tuples(services, ids), max_size=3))
    def delete_instances(self, keys: list[tuple[str, str]]) -> None:
        self.run(self.store.delete_instances(keys))
        for key in keys:
            self.instances.pop(key, None)

    @rule(
        version=st.integers(0, 10**9),
        digest=st.text(alphabet="0123456789abcdef", max_size=64),
        lapsed=st.frozensets(st.tuples(services, ids), max_size=3),
    )
    def put_table_version(
        self, version: int, digest: str, lapsed: frozenset[tuple[str, str]]
    ) -> None:
        self.run(self.store.put_table_version(version, digest, lapsed))
        self.table = (version, digest, lapsed)

    @rule(record=tokens)
    def put_token(self, record: TokenRecord) -> None:
        if record.id in self.tokens or any(t.digest == record.digest for t in self.tokens.values()):
            return  # ids and digests are unique: Tokens.mint never makes a second
        self.run(self.store.put_token(record))
        self.tokens[record.id] = record

    @rule(token_id=token_ids)
    def delete_token(self, token_id: str) -> None:
        self.run(self.store.delete_token(token_id))
        self.tokens.pop(token_id, None)

    @rule(used=st.dictionaries(token_ids, st.floats(1e9, 2e9), max_size=3))
    def touch_tokens(self, used: dict[str, float]) -> None:
        self.run(self.store.touch_tokens(used))
        for token_id, when in used.items():
            if token_id in self.tokens:
                self.tokens[token_id] = dataclasses.replace(self.tokens[token_id], last_used=when)

    @rule()
    def probe(self) -> None:
        self.run(self.store.probe())  # a write nobody reads: the invariant sees no change

    def now(self) -> float:
        return self.clock.time() if self.wall else self.clock.monotonic()

    def held(self, key: str) -> int | None:
        """The token holding ``key`` now, by the model."""
        lease = self.leases.get(key)
        return lease[0] if lease is not None and lease[1] > self.now() else None

    @rule(key=lock_keys, ttl_ms=ttls)
    def acquire_lock(self, key: str, ttl_ms: int) -> None:
        grant = self.run(self.store.acquire_lock(key, ttl_ms))
        if self.held(key) is not None:
            assert grant is None, f"{key} is held by {self.held(key)}, yet granted {grant}"
            return
        assert isinstance(grant, LockGrant), f"{key} is free, yet refused"
        assert grant.expires_in_ms == ttl_ms
        assert grant.token > self.highest.get(key, 0), "a fencing token went back"
        self.highest[key] = grant.token
        self.leases[key] = (grant.token, self.now() + ttl_ms / 1000)

    def token_for(self, key: str, stale: bool) -> int:
        """The holder's token, or one that does not hold ``key``."""
        holder = self.held(key)
        if holder is not None and not stale:
            return holder
        return self.highest.get(key, 0) - 1 if holder is not None else self.highest.get(key, 1)

    @rule(key=lock_keys, ttl_ms=ttls, stale=st.booleans())
    def renew_lock(self, key: str, ttl_ms: int, stale: bool) -> None:
        token = self.token_for(key, stale)
        renewed = self.run(self.store.renew_lock(key, token, ttl_ms))
        if self.held(key) == token:
            assert renewed == ttl_ms
            self.leases[key] = (token, self.now() + ttl_ms / 1000)
        else:
            assert renewed is None, f"token {token} renewed {key}, held by {self.held(key)}"

    @rule(key=lock_keys, stale=st.booleans())
    def release_lock(self, key: str, stale: bool) -> None:
        token = self.token_for(key, stale)
        released = self.run(self.store.release_lock(key, token))
        assert released == (self.held(key) == token)
        if released:
            del self.leases[key]

    @rule(ms=st.integers(0, 4_000))
    def time_passes(self, ms: int) -> None:
        self.clock.advance(ms / 1000)

    @rule(name=grant_names, services=st.frozensets(services, max_size=3))
    def put_lock_grant(self, name: str, services: frozenset[str]) -> None:
        self.run(self.store.put_lock_grant(name, services))
        self.grants[name] = services

    @rule(name=grant_names)
    def delete_lock_grant(self, name: str) -> None:
        self.run(self.store.delete_lock_grant(name))
        self.grants.pop(name, None)

    @rule(ca=cas, root=roots)
    def init_ca(self, ca: tuple[str, str], root: tuple[str, str] | None) -> None:
        stored = self.run(self.store.init_ca(*ca, root))
        if self.ca is None:
            self.ca = ca
            if root is not None:
                self.roots[root[0]] = root[1]
        assert stored == self.ca, "the first CA stays"

    @rule(ca=cas, root=roots)
    def replace_ca(self, ca: tuple[str, str], root: tuple[str, str] | None) -> None:
        self.run(self.store.replace_ca(*ca, root))
        self.ca = ca
        if root is not None:
            self.roots[root[0]] = root[1]

    @rule(fingerprint=fingerprints, pem=st.sampled_from(["pem-1", "pem-3"]))
    def put_root(self, fingerprint: str, pem: str) -> None:
        self.run(self.store.put_root(fingerprint, pem))
        self.roots[fingerprint] = pem

    @rule(fingerprint=fingerprints)
    def delete_root(self, fingerprint: str) -> None:
        self.run(self.store.delete_root(fingerprint))
        self.roots.pop(fingerprint, None)

    @rule()
    def reopen(self) -> None:
        if self.durable:
            self.run(self.store.close())
            self.store = type(self).make(self.path, self.clock)

    @invariant()
    def load_gives_back_what_was_written(self) -> None:
        snapshot: Snapshot = self.run(self.store.load())
        assert snapshot.policies == self.policies
        assert (snapshot.table_version, snapshot.table_digest, snapshot.lapsed) == self.table
        assert snapshot.epoch  # made once, kept for good
        if self.durable:
            assert self.epoch in ("", snapshot.epoch)
            self.epoch = snapshot.epoch
        assert sorted(snapshot.instances, key=lambda r: r.key) == sorted(
            self.instances.values(), key=lambda r: r.key
        )
        assert {t.id: t for t in snapshot.tokens} == self.tokens
        assert snapshot.lock_grants == self.grants
        assert snapshot.ca == self.ca
        assert snapshot.trust_bundle == self.roots

    def teardown(self) -> None:
        self.run(self.store.close())
        self.loop.close()
        self.dir.cleanup()


class MemoryContract(StoreContract):
    make = staticmethod(lambda path, clock: MemoryStore(clock))
    durable = False
    wall = False


class SqliteContract(StoreContract):
    make = staticmethod(lambda path, clock: SqliteStore(str(path / "meshlet.db"), clock))
    durable = True
    wall = True


class RedisContract(StoreContract):
    """On the session's redis-server (``_redis_for_contract``), each example under a prefix of
    its own (its directory's name); a reopen is a new client on the same keys. Redis ends
    leases on its own clock, which the model's fake one cannot move: the lock rules are left
    out here (plain methods override the rules) and ``test_fences_rise_...`` runs them on
    Redis in real time."""

    server = ""
    make = staticmethod(
        lambda path, clock: open_store(f"{RedisContract.server}?prefix={path.name}")
    )
    durable = True
    wall = True

    def acquire_lock(self, key: str, ttl_ms: int) -> None:
        pass

    def renew_lock(self, key: str, ttl_ms: int, stale: bool) -> None:
        pass

    def release_lock(self, key: str, stale: bool) -> None:
        pass


@pytest.fixture(autouse=True)
def _redis_for_contract(redis_server: RedisServer) -> None:
    RedisContract.server = redis_server.url


_settings = settings(
    max_examples=30,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestMemoryStoreContract = _settings(MemoryContract).TestCase
TestSqliteStoreContract = _settings(SqliteContract).TestCase
TestRedisStoreContract = _settings(RedisContract).TestCase


async def test_a_new_store_is_empty(store_kind: str, tmp_path: Path, redis_url: str) -> None:
    store = new_store(store_kind, tmp_path, redis_url)
    snapshot = await store.load()
    assert (snapshot.policies, snapshot.instances) == ({}, [])
    await store.close()


async def test_sqlite_refuses_a_second_user_of_the_file(tmp_path: Path) -> None:
    first = SqliteStore(str(tmp_path / "m.db"))
    await first.load()
    second = SqliteStore(str(tmp_path / "m.db"))
    with pytest.raises(StoreError, match="another control plane is using this file"):
        await second.load()
    await second.close()
    await first.close()
    third = SqliteStore(str(tmp_path / "m.db"))  # the lock went with the first's close
    await third.load()
    await third.close()


async def test_sqlite_uses_wal(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "m.db"))
    await store.load()
    await store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


async def test_sqlite_refuses_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    store = SqliteStore(str(tmp_path / "junk.db"))
    with pytest.raises(StoreError, match="not a database"):
        await store.load()
    await store.close()
    assert (tmp_path / "junk.db").read_bytes() == b"this is not sqlite" * 100


async def test_sqlite_refuses_a_newer_schema(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "m.db"))
    await store.load()
    await store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    store = SqliteStore(str(tmp_path / "m.db"))
    with pytest.raises(StoreError, match="schema version 99 is newer"):
        await store.load()
    await store.close()


async def test_sqlite_upgrades_a_version_1_file(tmp_path: Path) -> None:
    """Instances of a version 1 file came from sidecars' streams (mostly): they stay theirs."""
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('schema_version', '1');"
            "CREATE TABLE instances (service TEXT NOT NULL, id TEXT NOT NULL, address TEXT NOT "
            "NULL, port INTEGER NOT NULL, zone TEXT NOT NULL, weight INTEGER NOT NULL, metadata "
            "TEXT NOT NULL, draining INTEGER NOT NULL, PRIMARY KEY (service, id)) WITHOUT ROWID;"
            "INSERT INTO instances VALUES ('a', 'i1', '10.0.0.1', 80, '', 100, '{}', 0);"
        )
    store = SqliteStore(str(tmp_path / "m.db"))
    (record,) = (await store.load()).instances
    assert record.origin is Origin.STREAM
    await store.put_instance(dataclasses.replace(record, id="i2", origin=Origin.REST))
    await store.put_token(TokenRecord("t1", "a", "", "0" * 64, 1e9))
    await store.close()
    store = SqliteStore(str(tmp_path / "m.db"))
    snapshot = await store.load()
    assert [(r.id, r.origin) for r in snapshot.instances] == [
        ("i1", Origin.STREAM),
        ("i2", Origin.REST),
    ]
    assert [t.id for t in snapshot.tokens] == ["t1"]
    await store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("5",)


async def test_sqlite_upgrades_a_version_2_file_instances_get_no_namespace(tmp_path: Path) -> None:
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.executescript(
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            "INSERT INTO meta VALUES ('schema_version', '2');"
            "CREATE TABLE instances (service TEXT NOT NULL, id TEXT NOT NULL, address TEXT NOT "
            "NULL, port INTEGER NOT NULL, zone TEXT NOT NULL, weight INTEGER NOT NULL, metadata "
            "TEXT NOT NULL, draining INTEGER NOT NULL, origin TEXT NOT NULL DEFAULT 'rest', "
            "PRIMARY KEY (service, id)) WITHOUT ROWID;"
            "INSERT INTO instances VALUES ('a', 'i1', '10.0.0.1', 80, '', 100, '{}', 0, 'rest');"
        )
    store = SqliteStore(str(tmp_path / "m.db"))
    (record,) = (await store.load()).instances
    assert (record.id, record.namespace) == ("i1", "")
    await store.put_instance(dataclasses.replace(record, id="i2", namespace="shop"))
    await store.close()
    store = SqliteStore(str(tmp_path / "m.db"))
    assert [(r.id, r.namespace) for r in (await store.load()).instances] == [
        ("i1", ""),
        ("i2", "shop"),
    ]
    await store.close()


async def test_sqlite_upgrades_a_version_3_file_to_locks(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "m.db"))
    await store.put_policy("a", Policy())
    await store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:  # back to what version 3 wrote
        db.executescript(
            "DROP TABLE locks; DROP TABLE lock_grants;"
            "DROP TABLE ca; DROP TABLE trust_bundle; ALTER TABLE instances DROP COLUMN tls;"
            "UPDATE meta SET value = '3' WHERE key = 'schema_version';"
        )
    store = SqliteStore(str(tmp_path / "m.db"))
    assert (await store.load()).policies == {"a": Policy()}
    assert await store.acquire_lock("a/x", 1000) == LockGrant(1, 1000)
    await store.put_lock_grant("x", frozenset({"a", "b"}))
    await store.close()
    store = SqliteStore(str(tmp_path / "m.db"))
    assert (await store.load()).lock_grants == {"x": frozenset({"a", "b"})}
    await store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("5",)


async def test_sqlite_upgrades_a_version_4_file_to_the_ca(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "m.db"))
    await store.put_instance(InstanceRecord("a", "i1", "10.0.0.1", 80))
    await store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:  # back to what version 4 wrote
        db.executescript(
            "DROP TABLE ca; DROP TABLE trust_bundle; ALTER TABLE instances DROP COLUMN tls;"
            "UPDATE meta SET value = '4' WHERE key = 'schema_version';"
        )
    store = SqliteStore(str(tmp_path / "m.db"))
    (record,) = (await store.load()).instances
    assert record.tls is False
    await store.put_instance(dataclasses.replace(record, id="i2", tls=True))
    assert await store.init_ca("cert", "key", ("f", "pem")) == ("cert", "key")
    await store.close()
    store = SqliteStore(str(tmp_path / "m.db"))
    snapshot = await store.load()
    assert [(r.id, r.tls) for r in snapshot.instances] == [("i1", False), ("i2", True)]
    assert (snapshot.ca, snapshot.trust_bundle) == (("cert", "key"), {"f": "pem"})
    await store.close()


async def test_replicas_starting_together_agree_on_one_ca(redis_url: str) -> None:
    """SET NX: of several first starts at once, one CA is kept, with its root alone."""
    stores = [open_store(redis_url) for _ in range(5)]
    kept = await asyncio.gather(
        *(s.init_ca(f"cert-{i}", f"key-{i}", (f"f{i}", f"pem-{i}")) for i, s in enumerate(stores))
    )
    assert len(set(kept)) == 1
    winner = kept[0][0].removeprefix("cert-")
    snapshot = await stores[0].load()
    assert snapshot.ca == kept[0]
    assert snapshot.trust_bundle == {f"f{winner}": f"pem-{winner}"}
    for store in stores:
        await store.close()


async def test_fences_rise_across_release_expiry_and_reopen(
    store_kind: str, tmp_path: Path, redis_url: str
) -> None:
    """On the real clock: every way a lease ends lets the next holder in with a higher token."""
    store = new_store(store_kind, tmp_path, redis_url)
    first = await store.acquire_lock("svc/job", 10_000)
    assert first is not None
    assert await store.acquire_lock("svc/job", 10_000) is None  # held
    assert await store.release_lock("svc/job", first.token)
    assert not await store.release_lock("svc/job", first.token)  # once
    second = await store.acquire_lock("svc/job", 50)
    assert second is not None
    assert second.token > first.token
    await asyncio.sleep(0.15)  # its lease ends unrenewed
    assert await store.renew_lock("svc/job", second.token, 10_000) is None
    third = await store.acquire_lock("svc/job", 10_000)
    assert third is not None
    assert third.token > second.token
    assert await store.renew_lock("svc/job", third.token, 20_000) == 20_000
    assert await store.renew_lock("svc/job", second.token, 20_000) is None
    assert not await store.release_lock("svc/job", second.token)
    assert await store.acquire_lock("svc/other", 10_000) is not None  # keys are apart
    if store_kind in ("sqlite", "redis"):
        await store.close()
        store = new_store(store_kind, tmp_path, redis_url)
        await store.load()
        assert await store.acquire_lock("svc/job", 10_000) is None  # the lease outlived it
        assert await store.release_lock("svc/job", third.token)
        fourth = await store.acquire_lock("svc/job", 10_000)
        assert fourth is not None
        assert fourth.token > third.token
    await store.close()


async def test_sqlite_names_an_invalid_stored_row(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "m.db"))
    await store.load()
    await store.close()
    with sqlite3.connect(tmp_path / "m.db") as db:
        db.execute("INSERT INTO policies VALUES ('svc', '{\"lb\": \"bogus\"}')")
    store = SqliteStore(str(tmp_path / "m.db"))
    with pytest.raises(StoreError, match="stored policy of 'svc' is invalid: lb"):
        await store.load()
    await store.close()


async def test_sqlite_in_a_missing_directory_fails_clearly(tmp_path: Path) -> None:
    store = SqliteStore(str(tmp_path / "missing" / "m.db"))
    with pytest.raises(StoreError, match="cannot create lock file: No such file or directory"):
        await store.load()
    await store.close()


def test_store_urls(tmp_path: Path) -> None:
    assert isinstance(open_store("memory"), MemoryStore)
    sqlite_store = open_store(f"sqlite:///{tmp_path}/x.db")
    assert isinstance(sqlite_store, SqliteStore)
    assert sqlite_store.path == f"{tmp_path}/x.db"
    for bad in ("sqlite:///", "postgres://x", "meshlet.db"):
        with pytest.raises(ConfigError, match="store"):
            open_store(bad)
