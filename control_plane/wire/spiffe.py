"""SPIFFE IDs, the names of workload identities: ``spiffe://<trust domain>/ns/<namespace>/svc/
<service>`` (``default`` for an instance with no namespace). Standard library only, unlike
``wire.identity`` (certificates and CSRs): the sidecar's data path names and reads identities
without loading ``cryptography``."""

from __future__ import annotations

import re

from control_plane.wire.checks import SERVICE_NAME, TRUST_DOMAIN_NAME

TRUST_DOMAIN = "cluster.local"
_SPIFFE = re.compile(r"spiffe://([^/]+)/ns/([^/]+)/svc/([^/]+)")


def spiffe_id(trust_domain: str, namespace: str, service: str) -> str:
    return f"spiffe://{trust_domain}/ns/{namespace or 'default'}/svc/{service}"


def parse_spiffe_id(text: str) -> tuple[str, str, str] | None:
    """(trust domain, namespace, service) of ``spiffe://TD/ns/NS/svc/SVC``; None for anything
    else, names that are not valid included."""
    found = _SPIFFE.fullmatch(text) if isinstance(text, str) else None
    if found is None:
        return None
    trust_domain, namespace, service = found.groups()
    if TRUST_DOMAIN_NAME.fullmatch(trust_domain) is None:
        return None
    if SERVICE_NAME.fullmatch(namespace) is None or SERVICE_NAME.fullmatch(service) is None:
        return None
    return trust_domain, namespace, service
