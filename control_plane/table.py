"""The routing table sidecars receive, built from the registry in one place.

Every service is in it with its policy; its endpoints are the instances that are healthy
(new requests go there) or draining (marked: only what is in flight finishes). A service with
no routable instance stays, with no endpoints, so callers get 503 ``no-healthy-upstream``
rather than 404 ``no-route``.
"""

from __future__ import annotations

import hashlib
import json

from control_plane.model import Status
from control_plane.registry import Registry
from control_plane.wire import Endpoint, ServiceEntry, to_json

ROUTABLE = (Status.HEALTHY, Status.DRAINING)


def build_services(registry: Registry) -> dict[str, ServiceEntry]:
    services = {}
    for summary in registry.services():
        view = registry.service(summary.name)
        endpoints = tuple(
            Endpoint(
                address=i.record.address,
                port=i.record.port,
                weight=i.record.weight,
                zone=i.record.zone,
                draining=i.status is Status.DRAINING,
                instance=i.record.id,
            )
            for i in view.instances
            if i.status in ROUTABLE
        )
        services[view.name] = ServiceEntry(view.policy, endpoints)
    return services


def digest(services: dict[str, ServiceEntry]) -> str:
    """What identifies a table's content: equal content, equal digest, across restarts."""
    canonical = json.dumps(
        {name: to_json(entry) for name, entry in services.items()},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
