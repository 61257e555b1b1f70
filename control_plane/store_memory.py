"""A store that keeps everything in this process: for tests and throwaway control planes.

Its locks' fence (one counter for every key) lives as long as the process: a restarted
memory store hands out tokens from 1 again, which a fenced resource then refuses (use SQLite,
the default, when the resource outlives the control plane).
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

from control_plane.clock import Clock, SystemClock
from control_plane.locks import LockGrant
from control_plane.model import InstanceRecord, TokenRecord
from control_plane.store import Snapshot
from control_plane.wire import Policy

_PRUNE_AT = 1024
"""leases kept before expired ones are dropped (then twice those left)"""


class MemoryStore:
    shared = False

    def __init__(self, clock: Clock | None = None) -> None:
        self._clock = clock if clock is not None else SystemClock()
        self._policies: dict[str, Policy] = {}
        self._instances: dict[tuple[str, str], InstanceRecord] = {}
        self._table: tuple[int, str, frozenset[tuple[str, str]], float] = (
            0,
            "",
            frozenset(),
            0.0,
        )
        self._epoch = secrets.token_hex(8)
        self._tokens: dict[str, TokenRecord] = {}
        self._fence = 0
        """the last fencing token handed out, for any key"""
        self._locks: dict[str, tuple[int, float]] = {}
        """held key -> (its token, when its lease ends on the monotonic clock)"""
        self._prune_at = _PRUNE_AT
        self._grants: dict[str, frozenset[str]] = {}
        self._ca: tuple[str, str] | None = None
        self._bundle: dict[str, str] = {}

    async def load(self) -> Snapshot:
        version, digest, lapsed, built = self._table
        return Snapshot(
            dict(self._policies),
            list(self._instances.values()),
            table_version=version,
            table_digest=digest,
            table_built=built,
            epoch=self._epoch,
            lapsed=lapsed,
            tokens=list(self._tokens.values()),
            lock_grants=dict(self._grants),
            ca=self._ca,
            trust_bundle=dict(self._bundle),
        )

    async def put_policy(self, service: str, policy: Policy) -> None:
        self._policies[service] = policy

    async def delete_policy(self, service: str) -> None:
        self._policies.pop(service, None)

    async def put_instance(self, record: InstanceRecord) -> None:
        self._instances[record.key] = record

    async def delete_instances(self, keys: Sequence[tuple[str, str]]) -> None:
        for key in keys:
            self._instances.pop(key, None)

    async def put_table_version(
        self, version: int, digest: str, lapsed: frozenset[tuple[str, str]], built: float = 0.0
    ) -> None:
        self._table = (version, digest, lapsed, built)

    async def put_token(self, record: TokenRecord) -> None:
        self._tokens[record.id] = record

    async def delete_token(self, token_id: str) -> None:
        self._tokens.pop(token_id, None)

    async def touch_tokens(self, used: dict[str, float]) -> None:
        for token_id, when in used.items():
            if token_id in self._tokens:
                self._tokens[token_id] = dataclasses.replace(self._tokens[token_id], last_used=when)

    async def acquire_lock(self, key: str, ttl_ms: int) -> LockGrant | None:
        now = self._clock.monotonic()
        held = self._locks.get(key)
        if held is not None and held[1] > now:
            return None
        if len(self._locks) >= self._prune_at:
            self._prune(now)
        self._fence += 1
        self._locks[key] = (self._fence, now + ttl_ms / 1000)
        return LockGrant(self._fence, ttl_ms)

    def _prune(self, now: float) -> None:
        """Forget expired leases (the fence is one counter: nothing per key must stay)."""
        for key in [k for k, (_, until) in self._locks.items() if until <= now]:
            del self._locks[key]
        self._prune_at = max(_PRUNE_AT, 2 * len(self._locks))

    def _holds(self, key: str, token: int) -> bool:
        held = self._locks.get(key)
        return held is not None and held[0] == token and held[1] > self._clock.monotonic()

    async def renew_lock(self, key: str, token: int, ttl_ms: int) -> int | None:
        if not self._holds(key, token):
            return None
        self._locks[key] = (token, self._clock.monotonic() + ttl_ms / 1000)
        return ttl_ms

    async def release_lock(self, key: str, token: int) -> bool:
        if not self._holds(key, token):
            return False
        del self._locks[key]
        return True

    async def put_lock_grant(self, name: str, services: frozenset[str]) -> None:
        self._grants[name] = services

    async def delete_lock_grant(self, name: str) -> None:
        self._grants.pop(name, None)

    async def init_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> tuple[str, str]:
        if self._ca is None:
            await self.replace_ca(cert, key, root)
        assert self._ca is not None
        return self._ca

    async def replace_ca(self, cert: str, key: str, root: tuple[str, str] | None) -> None:
        self._ca = (cert, key)
        if root is not None:
            self._bundle[root[0]] = root[1]

    async def put_root(self, fingerprint: str, pem: str) -> None:
        self._bundle[fingerprint] = pem

    async def delete_root(self, fingerprint: str) -> None:
        self._bundle.pop(fingerprint, None)

    async def probe(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return (
            f"<MemoryStore [{len(self._policies)} policies, {len(self._instances)} instances, "
            f"{len(self._locks)} lock keys]>"
        )
