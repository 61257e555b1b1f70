"""Who may call this sidecar's service: mesh TLS and ``allow_from`` at the inbound listener.

The inbound listener takes TLS from other sidecars and plaintext on the same port (a
connection's first byte says which: a TLS record starts 0x16, no HTTP method does). The
verified caller is the service its certificate names; each request is then checked against the
service's own policy, as the table in force has it:

- ``mtls: strict`` refuses plaintext from anywhere but this host's loopback (the local app, and
  probes through ``127.0.0.1``); ``permissive`` (the default) takes both, as Istio's
  PeerAuthentication does during a migration;
- ``allow_from`` names the services that may call (``"*"``: any caller, plaintext included);
  a caller without a mesh identity matches only ``"*"``.

A refusal is a 403 ``forbidden``, counted by caller (``forbidden``; its keys are service names
from certificates of the mesh's own CA, or ``plaintext``: bounded by the mesh, not by a client).
"""

from __future__ import annotations

from collections.abc import Callable

from sidecar.errors import Reason
from sidecar.tls import MeshTls

#: (``mtls`` mode, ``allow_from``) of this sidecar's service in the table in force
Rules = tuple[str, tuple[str, ...]]
OPEN: Rules = ("permissive", ("*",))
"""the rules of a service the table does not name (a static file): as the policy defaults"""
_LOOPBACK = (b"127.0.0.1", b"::1")
PLAINTEXT = "plaintext"
"""the caller of a request that came without mesh TLS, in ``forbidden``"""


def service_of(identity: str, trust_domain: str) -> str | None:
    """The service a SPIFFE ID of this trust domain names (``spiffe://TD/ns/NS/svc/NAME``)."""
    prefix = f"spiffe://{trust_domain}/ns/"
    if not trust_domain or not identity.startswith(prefix):
        return None
    parts = identity[len(prefix) :].split("/")
    if len(parts) != 3 or parts[1] != "svc" or not parts[0] or not parts[2]:
        return None
    return parts[2]


class InboundGuard:
    """Mesh TLS credentials and the authorization rules of the inbound listener."""

    __slots__ = ("forbidden", "mesh", "rules")

    def __init__(self, mesh: MeshTls, rules: Callable[[], Rules]) -> None:
        self.mesh = mesh
        self.rules = rules
        #: refused requests by caller: a service name, or ``plaintext``
        self.forbidden: dict[str, int] = {}

    def check(self, peer: str | None, client_ip: bytes) -> tuple[Reason, str] | None:
        """None when the request may go to the app, else the 403 and why."""
        mode, allowed = self.rules()
        caller = None if peer is None else service_of(peer, self.mesh.trust_domain)
        if peer is None and mode == "strict" and client_ip not in _LOOPBACK:
            why = "mtls is strict: plaintext from another host is refused"
        elif "*" in allowed or (caller is not None and caller in allowed):
            return None
        elif caller is None:
            why = "allow_from names services; this caller has no mesh identity"
        else:
            why = f"allow_from does not list {caller}"
        name = PLAINTEXT if caller is None else caller
        self.forbidden[name] = self.forbidden.get(name, 0) + 1
        return Reason.FORBIDDEN, why
