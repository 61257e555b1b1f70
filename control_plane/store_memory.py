"""A store that keeps everything in this process: for tests and throwaway control planes."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence

from control_plane.model import InstanceRecord, TokenRecord
from control_plane.store import Snapshot
from control_plane.wire import Policy


class MemoryStore:
    shared = False

    def __init__(self) -> None:
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

    async def probe(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<MemoryStore [{len(self._policies)} policies, {len(self._instances)} instances]>"
