"""Where the registry keeps what must survive a restart, behind one Protocol.

A store holds the explicit policies, the instance records (with their weights and drains),
the service tokens (as digests), the mesh's CA (its key too: the one key that leaves the
process that made it) and trust bundle, and the apps' locks (``locks``): the leases held now, the
fence (the last fencing token handed out, one counter for every key, kept for good, so a
key's row can go once its lease ends), and the admin's grants of shared lock names.
Heartbeats are soft state and never reach a store. Implementations: ``store_sqlite`` (the
default), ``store_memory`` and ``store_redis`` (which control-plane replicas share); one contract
suite (``tests/control_plane/test_store_contract``) runs over every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from control_plane.errors import ConfigError
from control_plane.locks import LockGrant
from control_plane.model import InstanceRecord, TokenRecord
from control_plane.wire import Policy


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Everything a store holds, as loaded at start-up."""

    policies: dict[str, Policy]
    instances: list[InstanceRecord]
    table_version: int = 0
    """the last routing-table version pushed (versions never go back, across restarts)"""
    table_digest: str = ""
    """the digest of that table's content"""
    table_built: float = 0.0
    """wall-clock time that version was built"""
    epoch: str = ""
    """made once when the store is new: versions compare only within one epoch, so sidecars
    notice a control plane whose store was reset (its versions start over)"""
    lapsed: frozenset[tuple[str, str]] = frozenset()
    """instances the last published table left out as unhealthy"""
    tokens: list[TokenRecord] = field(default_factory=list)
    """service tokens"""
    lock_grants: dict[str, frozenset[str]] = field(default_factory=dict)
    """shared lock names -> the services that share them"""
    ca: tuple[str, str] | None = None
    """the signing CA: its certificate (with any intermediates above it) and key, PEM"""
    trust_bundle: dict[str, str] = field(default_factory=dict)
    """the roots sidecars trust: hex SHA-256 of each (DER) -> its PEM"""


@dataclass(frozen=True, slots=True)
class Fence:
    """A held lease (the reaper's): who holds it and its fencing token."""

    holder: str
    token: int


@dataclass(frozen=True, slots=True)
class Changes:
    """What a shared store's change stream says changed since a replica last looked."""

    last: str
    """the stream id to read after next time"""
    keys: dict[str, set[str]]
    """kind (p policy, i instance, t token, h health, g lock grant, b trust-bundle root,
    c the CA) -> keys"""
    read: int = 0
    """entries read"""
    gap: bool = False
    """entries after the last id were trimmed: only a reload of everything catches up"""


class Store(Protocol):
    """Each write is durable when its coroutine returns; a failed write raises ``StoreError``
    and changes nothing."""

    shared: bool
    """whether several control planes may use it at once (then they run as replicas)"""

    async def load(self) -> Snapshot: ...

    async def put_policy(self, service: str, policy: Policy) -> None: ...

    async def delete_policy(self, service: str) -> None: ...

    async def put_instance(self, record: InstanceRecord) -> None: ...

    async def delete_instances(self, keys: Sequence[tuple[str, str]]) -> None: ...

    async def put_table_version(
        self, version: int, digest: str, lapsed: frozenset[tuple[str, str]], built: float = 0.0
    ) -> None:
        """What was published: its version, its content's digest, which instances were
        unhealthy in it (so a restart does not bring dead instances back), and when it was
        built (wall clock)."""
        ...

    async def put_token(self, record: TokenRecord) -> None: ...

    async def delete_token(self, token_id: str) -> None: ...

    async def touch_tokens(self, used: dict[str, float]) -> None:
        """Record when tokens were last used (token id -> wall-clock seconds); ids no longer
        stored are ignored."""
        ...

    async def acquire_lock(self, key: str, ttl_ms: int) -> LockGrant | None:
        """Take lock ``key`` for ``ttl_ms`` milliseconds if it is free (never held, released,
        or its lease expired), with the next fencing token: strictly greater than every token
        ever handed out for ``key``, across releases, expiries and restarts (for a durable
        store). None while another holds it."""
        ...

    async def renew_lock(self, key: str, token: int, ttl_ms: int) -> int | None:
        """Extend the lease of ``key``'s holder ``token`` to ``ttl_ms`` from now: the lease's
        length in milliseconds; None if ``token`` no longer holds it (expired, released,
        taken by a later token)."""
        ...

    async def release_lock(self, key: str, token: int) -> bool:
        """Free ``key`` if ``token`` holds it (True); its fence stays."""
        ...

    async def put_lock_grant(self, name: str, services: frozenset[str]) -> None:
        """Share lock ``name`` among ``services`` (replacing an earlier grant of it)."""
        ...

    async def init_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> tuple[str, str]:
        """Keep this CA (PEM certificate, key) unless the store holds one already, atomically:
        replicas starting together agree on one. With it ``root`` (fingerprint, PEM), when
        given, joins the trust bundle. The CA the store holds now."""
        ...

    async def replace_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> None:
        """Make this the CA (one handed to the control plane); ``root`` joins the trust bundle.
        The roots already there stay: the old root is trusted until an admin deletes it."""
        ...

    async def put_root(self, fingerprint: str, pem: str) -> None: ...

    async def delete_root(self, fingerprint: str) -> None: ...

    async def delete_lock_grant(self, name: str) -> None: ...

    async def probe(self) -> None:
        """A write no reader sees: StoreError when the store cannot take writes now."""
        ...

    async def close(self) -> None: ...


def open_store(url: str) -> Store:
    """A store from ``--store``: ``sqlite:///relative.db``, ``sqlite:////abs/path.db``,
    ``redis://HOST:PORT/DB`` (``rediss://`` for TLS), or ``memory``."""
    if url == "memory":
        from control_plane.store_memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if not path:
            raise ConfigError("store", "sqlite:/// needs a file path, e.g. sqlite:///meshlet.db")
        from control_plane.store_sqlite import SqliteStore

        return SqliteStore(path)
    if url.startswith(("redis://", "rediss://")):
        try:
            from control_plane.store_redis import RedisStore
        except ImportError:
            raise ConfigError(
                "store", "a redis store needs the redis package: pip install 'meshlet[redis]'"
            ) from None
        return RedisStore.from_url(url)
    raise ConfigError(
        "store", f"unsupported store {url!r}; use sqlite:///PATH, redis://HOST:PORT/DB or memory"
    )
