"""The routing table sidecars receive, built from the registry in one place.

Every service is in it with its policy; its endpoints are the instances that are healthy
(new requests go there) or draining (marked: only what is in flight finishes). A service with
no routable instance stays, with no endpoints, so callers get 503 ``no-healthy-upstream``
rather than 404 ``no-route``.

The control plane needs the table only as JSON (to digest and to push), so it is built as
JSON directly from records the registry already validated, each policy's JSON computed once.
The shape is ``wire.Table``'s, which is what sidecars parse it with.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from control_plane.model import Status
from control_plane.registry import Registry
from control_plane.wire import Policy, to_json


@functools.lru_cache(maxsize=1024)
def _policy_json(policy: Policy) -> dict[str, Any]:
    return to_json(policy)


def build(registry: Registry) -> dict[str, Any]:
    """Every service's ``{"policy", "endpoints"}``, as JSON-ready data."""
    services = {}
    for view in registry.views():
        endpoints = [
            {
                "address": i.record.address,
                "port": i.record.port,
                "weight": i.record.weight,
                "zone": i.record.zone,
                "draining": i.status is Status.DRAINING,
                "instance": i.record.id,
            }
            for i in view.instances
            if i.status is Status.HEALTHY or i.status is Status.DRAINING
        ]
        services[view.name] = {"policy": _policy_json(view.policy), "endpoints": endpoints}
    return services


def render(services: dict[str, Any]) -> tuple[str, str]:
    """(the services as canonical JSON, its digest). Equal content gives an equal digest,
    across restarts; the JSON is serialized once and reused in every push."""
    canonical = json.dumps(services, sort_keys=True, separators=(",", ":"))
    return canonical, hashlib.sha256(canonical.encode()).hexdigest()


def message(services_json: str, version: int, epoch: str) -> str:
    """The table message (as ``wire.table_message`` writes it) from rendered services."""
    return (
        f'{{"type":"table","services":{services_json},"version":{version},'
        f'"epoch":{json.dumps(epoch)}}}'
    )
