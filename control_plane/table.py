"""The routing table sidecars receive, built from the registry in one place.

Every service is in it with its policy; its endpoints are the instances that are healthy
(new requests go there) or draining (marked: only what is in flight finishes). A service with
no routable instance stays, with no endpoints, so callers get 503 ``no-healthy-upstream``
rather than 404 ``no-route``.

The control plane needs the table only as JSON (to digest and to push), so it is built as
JSON directly from records the registry already validated, each policy's JSON computed once.
The shape is ``wire.Table``'s, which is what sidecars parse it with.

A service with a hash policy also carries its ring (``ring``), built over its endpoints that
are not draining; ring owners index the service's endpoint list. Rings are cached by the
endpoints they were built from, so a change elsewhere rebuilds none.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from control_plane import ring
from control_plane.model import ServiceView, Status
from control_plane.wire import HASH_POLICIES, Policy, to_json

#: (instance id, weight, draining) of a service's endpoints, in table order
Members = tuple[tuple[str, int, bool], ...]


@functools.lru_cache(maxsize=1024)
def _policy_json(policy: Policy) -> dict[str, Any]:
    return to_json(policy)


def build(views: list[ServiceView]) -> dict[str, Any]:
    """Every service's ``{"policy", "endpoints"[, "ring"]}``, as JSON-ready data."""
    return {view.name: build_one(view) for view in views}


def unhealthy(views: list[ServiceView]) -> frozenset[tuple[str, str]]:
    """The instances left out of the table as unhealthy (draining ones are in it)."""
    return frozenset(
        i.record.key for view in views for i in view.instances if i.status is Status.UNHEALTHY
    )


def build_one(view: ServiceView) -> dict[str, Any]:
    """One service's entry: policy, routable endpoints, and its ring if it hashes."""
    endpoints = [
        {
            "address": i.record.address,
            "port": i.record.port,
            "weight": i.record.weight,
            "zone": i.record.zone,
            "draining": i.status is Status.DRAINING,
            "instance": i.record.id,
            # (only when said: a table without them is one sidecars before them take too)
            **({"namespace": i.record.namespace} if i.record.namespace else {}),
            **({"tls": True} if i.record.tls else {}),
        }
        for i in view.instances
        if i.status is Status.HEALTHY or i.status is Status.DRAINING
    ]
    entry: dict[str, Any] = {"policy": _policy_json(view.policy), "endpoints": endpoints}
    if view.policy.lb in HASH_POLICIES and any(not e["draining"] for e in endpoints):
        members = tuple((e["instance"], e["weight"], e["draining"]) for e in endpoints)
        entry["ring"] = ring_for(view.policy.lb, members)[0]
    return entry


@functools.lru_cache(maxsize=1024)
def ring_for(algorithm: str, members: Members) -> tuple[dict[str, str], ring.Ring]:
    """(the packed ring for the table, the ring) over the members not draining; owners are
    positions in ``members``."""
    live = [i for i, (_, _, draining) in enumerate(members) if not draining]
    built = ring.build(algorithm, [members[i][0] for i in live], [members[i][1] for i in live])
    if len(live) != len(members):  # renumber: ring owners index the whole endpoint list
        owners = type(built.owners)(built.owners.typecode, (live[o] for o in built.owners))
        built = ring.Ring(built.algorithm, owners, built.points)
    return ring.encode(built), built


def ring_owner(entry: dict[str, Any], key: str) -> str | None:
    """The instance id that owns ``key`` in a built service entry's ring, as every sidecar
    with that table finds it; None when the service has no ring (no routable endpoint)."""
    if "ring" not in entry:
        return None
    members = tuple((e["instance"], e["weight"], e["draining"]) for e in entry["endpoints"])
    _, built = ring_for(entry["policy"]["lb"], members)
    owner: str = members[built.lookup(ring.key_hash(key.encode()))][0]
    return owner


def render(
    services: dict[str, Any], trust_domain: str = "", trust_bundle: tuple[str, ...] = ()
) -> tuple[str, str]:
    """(the table's content as canonical JSON members: the services and the trust the mesh's
    TLS goes by, its digest). Equal content gives an equal digest, across restarts; the JSON
    is serialized once and reused in every push."""
    canonical = json.dumps(
        {"services": services, "trust_domain": trust_domain, "trust_bundle": trust_bundle},
        sort_keys=True,
        separators=(",", ":"),
    )[1:-1]
    return canonical, hashlib.sha256(canonical.encode()).hexdigest()


def message(content: str, version: int, epoch: str, built: float) -> str:
    """The table message (as ``wire.table_message`` writes it) from rendered content."""
    return (
        f'{{"type":"table",{content},"version":{version},'
        f'"epoch":{json.dumps(epoch)},"built":{built!r}}}'
    )
