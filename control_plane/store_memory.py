"""A store that keeps everything in this process: for tests and throwaway control planes."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

from control_plane.model import InstanceRecord
from control_plane.store import Snapshot
from control_plane.wire import Policy


class MemoryStore:
    def __init__(self) -> None:
        self._policies: dict[str, Policy] = {}
        self._instances: dict[tuple[str, str], InstanceRecord] = {}
        self._table: tuple[int, str, frozenset[tuple[str, str]]] = (0, "", frozenset())
        self._epoch = secrets.token_hex(8)

    async def load(self) -> Snapshot:
        version, digest, lapsed = self._table
        return Snapshot(
            dict(self._policies),
            list(self._instances.values()),
            table_version=version,
            table_digest=digest,
            epoch=self._epoch,
            lapsed=lapsed,
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
        self, version: int, digest: str, lapsed: frozenset[tuple[str, str]]
    ) -> None:
        self._table = (version, digest, lapsed)

    async def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<MemoryStore [{len(self._policies)} policies, {len(self._instances)} instances]>"
