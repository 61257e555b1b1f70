"""Who may register again, change or remove an instance that exists: a plain decision.

An instance belongs to whoever registered it (its ``Origin``) and, while connected, to the
sidecar stream that registered it. The admin token may do anything. Any other caller acting
for the instance's service (a service token, the join token) may not:

    admin   change or remove an instance the admin registered
    owned   change or remove an instance that another node's live stream owns (or the same
            node's with another token)
    rest    take over, by a stream, an instance registered over REST

A REST registration that changes nothing routable is no change: an app that registers itself
again at start, or instead of heartbeating, is not refused. The API and the publisher ask
``refusal`` before they touch the registry, so a refused caller leaves the record as it was.
"""

from __future__ import annotations

from dataclasses import dataclass

from control_plane.access import Principal, Role
from control_plane.model import InstanceRecord, Origin
from control_plane.wire import Registration


@dataclass(frozen=True, slots=True)
class Claimant:
    """Who wants an instance: a token, and the sidecar node for a stream ("" over REST)."""

    principal: Principal
    node: str = ""

    @property
    def origin(self) -> Origin:
        """What an instance it registers is recorded as."""
        if self.principal.role is Role.ADMIN:
            return Origin.ADMIN
        return Origin.STREAM if self.node else Origin.REST


@dataclass(frozen=True, slots=True)
class Refusal:
    reason: str
    """admin, owned or rest (a metric label)"""
    message: str


def refusal(
    record: InstanceRecord | None,
    owner: Claimant | None,
    claimant: Claimant,
    *,
    changes: bool = True,
) -> Refusal | None:
    """Why ``claimant`` may not register again, change or remove ``record``, which the live
    stream ``owner`` holds (None: no stream); None when it may."""
    if record is None or claimant.principal.admin or not changes:
        return None
    instance = f"{record.service}/{record.id}"
    if record.origin is Origin.ADMIN:
        return Refusal("admin", f"{instance} was registered by the admin; only the admin may")
    if owner is not None and owner != claimant:
        return Refusal("owned", f"{instance} belongs to the live stream of node {owner.node}")
    if record.origin is Origin.REST and claimant.node:
        return Refusal("rest", f"{instance} was registered over REST; a stream may not take it")
    return None


def changes(record: InstanceRecord | None, reg: Registration) -> bool:
    """Whether registering ``reg`` would change where or how much traffic goes."""
    if record is None:
        return True
    return (
        (reg.address, reg.port) != (record.address, record.port)
        or reg.weight not in (None, record.weight)
        or reg.zone not in (None, record.zone)
        or reg.namespace not in (None, record.namespace)
        or reg.metadata not in (None, record.metadata)
    )
