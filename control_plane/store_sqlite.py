"""The default store: one SQLite file in WAL mode, driven from one worker thread.

Every call runs on a single dedicated thread (SQLite calls block), so writes reach the file in
the order they were made. Each write is one transaction committed before its coroutine
returns. ``synchronous=NORMAL`` in WAL mode keeps every committed write across a crash of this
process (SIGKILL included); only a power loss or kernel crash can lose the last commits.

Locks: ``locks`` holds the leases held now, each ending at a wall-clock time (a lease must
outlive a restart of the control plane); the fence is ``meta.lock_fence``, one counter for
every key. A lease's row is deleted when it is released and when it has ended. A wall clock
that jumps forward ends leases early, which the fencing token makes safe.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import secrets
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from control_plane.clock import Clock, SystemClock
from control_plane.errors import StoreError
from control_plane.locks import LockGrant
from control_plane.model import InstanceRecord, Origin, TokenRecord
from control_plane.store import Snapshot
from control_plane.wire import Policy, WireError, parse_policy, to_json

SCHEMA_VERSION = 5
"""1: policies, instances, meta; 2: instances.origin, tokens; 3: instances.namespace;
4: locks, lock_grants (and meta's lock_fence); 5: ca, trust_bundle, instances.tls"""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS policies (service TEXT PRIMARY KEY, document TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
    service TEXT NOT NULL,
    id TEXT NOT NULL,
    address TEXT NOT NULL,
    port INTEGER NOT NULL,
    zone TEXT NOT NULL,
    weight INTEGER NOT NULL,
    metadata TEXT NOT NULL,
    draining INTEGER NOT NULL,
    origin TEXT NOT NULL DEFAULT 'rest',
    namespace TEXT NOT NULL DEFAULT '',
    tls INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (service, id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tokens (
    id TEXT PRIMARY KEY,
    service TEXT NOT NULL,
    description TEXT NOT NULL,
    digest TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,
    last_used REAL
);
CREATE TABLE IF NOT EXISTS locks (
    key TEXT PRIMARY KEY,
    token INTEGER NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS locks_expires ON locks (expires);
CREATE TABLE IF NOT EXISTS lock_grants (name TEXT PRIMARY KEY, services TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ca (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    cert TEXT NOT NULL,
    key TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS trust_bundle (fingerprint TEXT PRIMARY KEY, pem TEXT NOT NULL);
"""
_INSTANCE_COLUMNS = (
    "service, id, address, port, zone, weight, metadata, draining, origin, namespace, tls"
)

T = TypeVar("T")


class SqliteStore:
    shared = False

    def __init__(self, path: str, clock: Clock | None = None) -> None:
        self.path = path
        self._clock = clock if clock is not None else SystemClock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="meshlet-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            if self._db is None:
                self._db = self._open()
            return fn(self._db)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, call)
        except sqlite3.Error as e:
            raise StoreError(f"sqlite {self.path}: {e}") from e

    def _open(self) -> sqlite3.Connection:
        self._lock_file()
        db = sqlite3.connect(self.path, check_same_thread=False)
        try:
            db.execute("PRAGMA busy_timeout = 5000")
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StoreError(f"sqlite {self.path}: cannot use WAL mode (got {mode})")
            db.execute("PRAGMA synchronous = NORMAL")
            with db:
                db.executescript(_SCHEMA)
                row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                if row is not None and int(row[0]) > SCHEMA_VERSION:
                    raise StoreError(
                        f"sqlite {self.path}: schema version {row[0]} is newer than this "
                        f"meshlet understands ({SCHEMA_VERSION})"
                    )
                if row is not None and int(row[0]) < 2:
                    # instances of version 1 came mostly from sidecars' streams: marking them
                    # rest would lock every sidecar out of its own instance after an upgrade
                    db.execute(
                        "ALTER TABLE instances ADD COLUMN origin TEXT NOT NULL DEFAULT 'stream'"
                    )
                if row is not None and int(row[0]) < 3:
                    db.execute(
                        "ALTER TABLE instances ADD COLUMN namespace TEXT NOT NULL DEFAULT ''"
                    )
                if row is not None and int(row[0]) < 5:
                    db.execute("ALTER TABLE instances ADD COLUMN tls INTEGER NOT NULL DEFAULT 0")
                db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)",
                    (str(SCHEMA_VERSION),),
                )
        except BaseException:
            db.close()
            raise
        return db

    def _lock_file(self) -> None:
        """One control plane per file: two writing one file would undo each other's writes
        in memory. The lock (``PATH.lock``, flock) goes with the process."""
        try:
            fd = os.open(f"{self.path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreError(f"sqlite {self.path}: cannot create lock file: {e.strerror}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"sqlite {self.path}: another control plane is using this file; "
                "give each control plane its own --store"
            ) from None
        self._lock_fd = fd

    async def load(self) -> Snapshot:
        def load(db: sqlite3.Connection) -> Snapshot:
            policies = {}
            for service, document in db.execute("SELECT service, document FROM policies"):
                try:
                    policies[service] = parse_policy(json.loads(document))
                except (ValueError, WireError) as e:
                    raise StoreError(
                        f"sqlite {self.path}: stored policy of {service!r} is invalid: {e}"
                    ) from e
            instances = []
            for row in db.execute(
                f"SELECT {_INSTANCE_COLUMNS} FROM instances ORDER BY service, id"
            ):
                service, id_, address, port, zone, weight, metadata, draining, origin, ns, tls = row
                try:
                    instances.append(
                        InstanceRecord(
                            service,
                            id_,
                            address,
                            port,
                            zone=zone,
                            weight=weight,
                            metadata=json.loads(metadata),
                            draining=bool(draining),
                            origin=Origin(origin),
                            namespace=ns,
                            tls=bool(tls),
                        )
                    )
                except (ValueError, WireError) as e:
                    raise StoreError(
                        f"sqlite {self.path}: stored instance {service}/{id_} is invalid: {e}"
                    ) from e
            meta = dict(db.execute("SELECT key, value FROM meta"))
            if "epoch" not in meta:
                meta["epoch"] = secrets.token_hex(8)
                with db:
                    db.execute("INSERT INTO meta VALUES ('epoch', ?)", (meta["epoch"],))
            lapsed = frozenset(tuple(k) for k in json.loads(meta.get("lapsed", "[]")))
            tokens = [
                TokenRecord(*row)
                for row in db.execute(
                    "SELECT id, service, description, digest, created, last_used FROM tokens"
                )
            ]
            grants = {
                name: frozenset(json.loads(services))
                for name, services in db.execute("SELECT name, services FROM lock_grants")
            }
            ca = db.execute("SELECT cert, key FROM ca").fetchone()
            return Snapshot(
                policies,
                instances,
                table_version=int(meta.get("table_version", 0)),
                table_digest=meta.get("table_digest", ""),
                table_built=float(meta.get("table_built", 0)),
                epoch=meta["epoch"],
                lapsed=lapsed,
                tokens=tokens,
                lock_grants=grants,
                ca=None if ca is None else (ca[0], ca[1]),
                trust_bundle=dict(db.execute("SELECT fingerprint, pem FROM trust_bundle")),
            )

        return await self._run(load)

    async def put_policy(self, service: str, policy: Policy) -> None:
        document = json.dumps(to_json(policy), separators=(",", ":"))

        def put(db: sqlite3.Connection) -> None:
            with db:
                db.execute("INSERT OR REPLACE INTO policies VALUES (?, ?)", (service, document))

        await self._run(put)

    async def delete_policy(self, service: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM policies WHERE service = ?", (service,))

        await self._run(delete)

    async def put_instance(self, record: InstanceRecord) -> None:
        row = (
            record.service,
            record.id,
            record.address,
            record.port,
            record.zone,
            record.weight,
            json.dumps(record.metadata, separators=(",", ":")),
            int(record.draining),
            record.origin.value,
            record.namespace,
            int(record.tls),
        )

        def put(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    f"INSERT OR REPLACE INTO instances ({_INSTANCE_COLUMNS}) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )

        await self._run(put)

    async def delete_instances(self, keys: Sequence[tuple[str, str]]) -> None:
        rows = list(keys)

        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("DELETE FROM instances WHERE service = ? AND id = ?", rows)

        await self._run(delete)

    async def put_table_version(
        self, version: int, digest: str, lapsed: frozenset[tuple[str, str]], built: float = 0.0
    ) -> None:
        rows = [
            ("table_version", str(version)),
            ("table_digest", digest),
            ("table_built", repr(built)),
            ("lapsed", json.dumps(sorted(lapsed), separators=(",", ":"))),
        ]

        def put(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows)

        await self._run(put)

    async def put_token(self, record: TokenRecord) -> None:
        row = (record.id, record.service, record.description, record.digest, record.created)

        def put(db: sqlite3.Connection) -> None:
            with db:
                db.execute(
                    "INSERT INTO tokens (id, service, description, digest, created) "
                    "VALUES (?, ?, ?, ?, ?)",
                    row,
                )

        await self._run(put)

    async def delete_token(self, token_id: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM tokens WHERE id = ?", (token_id,))

        await self._run(delete)

    async def touch_tokens(self, used: dict[str, float]) -> None:
        rows = [(when, token_id) for token_id, when in used.items()]

        def touch(db: sqlite3.Connection) -> None:
            with db:
                db.executemany("UPDATE tokens SET last_used = ? WHERE id = ?", rows)

        await self._run(touch)

    async def acquire_lock(self, key: str, ttl_ms: int) -> LockGrant | None:
        now = self._clock.time()

        def acquire(db: sqlite3.Connection) -> LockGrant | None:
            held = db.execute("SELECT expires FROM locks WHERE key = ?", (key,)).fetchone()
            if held is not None and held[0] > now:
                return None
            with db:
                db.execute("DELETE FROM locks WHERE expires <= ?", (now,))
                row = db.execute("SELECT value FROM meta WHERE key = 'lock_fence'").fetchone()
                token = int(row[0]) + 1 if row is not None else 1
                db.execute("INSERT OR REPLACE INTO meta VALUES ('lock_fence', ?)", (str(token),))
                db.execute(
                    "INSERT OR REPLACE INTO locks VALUES (?, ?, ?)",
                    (key, token, now + ttl_ms / 1000),
                )
            return LockGrant(token, ttl_ms)

        return await self._run(acquire)

    async def renew_lock(self, key: str, token: int, ttl_ms: int) -> int | None:
        now = self._clock.time()

        def renew(db: sqlite3.Connection) -> bool:
            with db:
                done = db.execute(
                    "UPDATE locks SET expires = ? WHERE key = ? AND token = ? AND expires > ?",
                    (now + ttl_ms / 1000, key, token, now),
                )
            return done.rowcount == 1

        return ttl_ms if await self._run(renew) else None

    async def release_lock(self, key: str, token: int) -> bool:
        now = self._clock.time()

        def release(db: sqlite3.Connection) -> bool:
            with db:
                done = db.execute(
                    "DELETE FROM locks WHERE key = ? AND token = ? AND expires > ?",
                    (key, token, now),
                )
            return done.rowcount == 1

        return await self._run(release)

    async def put_lock_grant(self, name: str, services: frozenset[str]) -> None:
        row = (name, json.dumps(sorted(services), separators=(",", ":")))

        def put(db: sqlite3.Connection) -> None:
            with db:
                db.execute("INSERT OR REPLACE INTO lock_grants VALUES (?, ?)", row)

        await self._run(put)

    async def delete_lock_grant(self, name: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM lock_grants WHERE name = ?", (name,))

        await self._run(delete)

    async def init_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> tuple[str, str]:
        def init(db: sqlite3.Connection) -> tuple[str, str]:
            with db:
                if db.execute("INSERT OR IGNORE INTO ca VALUES (1, ?, ?)", (cert, key)).rowcount:
                    _add_root(db, root)
                stored = db.execute("SELECT cert, key FROM ca").fetchone()
            return stored[0], stored[1]

        return await self._run(init)

    async def replace_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> None:
        def replace(db: sqlite3.Connection) -> None:
            with db:
                db.execute("INSERT OR REPLACE INTO ca VALUES (1, ?, ?)", (cert, key))
                _add_root(db, root)

        await self._run(replace)

    async def put_root(self, fingerprint: str, pem: str) -> None:
        def put(db: sqlite3.Connection) -> None:
            with db:
                _add_root(db, (fingerprint, pem))

        await self._run(put)

    async def delete_root(self, fingerprint: str) -> None:
        def delete(db: sqlite3.Connection) -> None:
            with db:
                db.execute("DELETE FROM trust_bundle WHERE fingerprint = ?", (fingerprint,))

        await self._run(delete)

    async def probe(self) -> None:
        row = ("probe", str(self._clock.time()))

        def probe(db: sqlite3.Connection) -> None:
            with db:
                db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", row)

        await self._run(probe)

    async def close(self) -> None:
        def close() -> None:
            if self._db is not None:
                self._db.close()
                self._db = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None

        await asyncio.get_running_loop().run_in_executor(self._executor, close)
        self._executor.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"<SqliteStore {self.path} [{'open' if self._db else 'closed'}]>"


def _add_root(db: sqlite3.Connection, root: tuple[str, str] | None) -> None:
    """A root joins the trust bundle, in the caller's transaction."""
    if root is not None:
        db.execute("INSERT OR REPLACE INTO trust_bundle VALUES (?, ?)", root)
