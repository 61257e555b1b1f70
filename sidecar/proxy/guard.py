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
from certificates of the mesh's own CA, ``plaintext`` or ``unknown``: bounded by the mesh, not
by a client).
"""

from __future__ import annotations

from control_plane.wire import Table
from control_plane.wire.spiffe import parse_spiffe_id
from sidecar.errors import Reason
from sidecar.tls import MeshTls

_LOOPBACK = (b"127.0.0.1", b"::1")
PLAINTEXT = "plaintext"
"""the caller of a request that came without mesh TLS, in ``forbidden``"""
UNKNOWN = "unknown"
"""a verified caller whose identity names no service of this trust domain"""


def service_of(identity: str, trust_domain: str) -> str | None:
    """The service a SPIFFE ID of this trust domain names."""
    parsed = parse_spiffe_id(identity)
    return parsed[2] if parsed is not None and parsed[0] == trust_domain else None


class InboundGuard:
    """Mesh TLS credentials and the authorization rules of the inbound listener: its
    service's ``mtls`` and ``allow_from`` in the table in force (``apply``), as the policy
    defaults while the table does not name the service (a static file)."""

    __slots__ = ("allowed", "forbidden", "mesh", "mode", "open", "service")

    def __init__(self, mesh: MeshTls, service: str) -> None:
        self.mesh = mesh
        self.service = service
        self.mode = "permissive"
        self.allowed: tuple[str, ...] = ("*",)
        #: any caller may call, plaintext included: ``check`` has nothing to refuse (asked
        #: once a request before it)
        self.open = True
        #: refused requests by caller: a service name, or ``plaintext``
        self.forbidden: dict[str, int] = {}

    def apply(self, table: Table) -> None:
        """The rules of the table just put in force."""
        own = table.services.get(self.service)
        if own is None:
            self.rules("permissive", ("*",))
        else:
            self.rules(own.policy.mtls, own.policy.allow_from)

    def rules(self, mode: str, allowed: tuple[str, ...]) -> None:
        """``mtls`` (``strict`` or ``permissive``) and ``allow_from`` (``*``: any caller)."""
        self.mode, self.allowed = mode, allowed
        self.open = mode != "strict" and "*" in allowed

    def check(self, peer: str | None, client_ip: bytes) -> tuple[Reason, str] | None:
        """None when the request may go to the app, else the 403 and why."""
        allowed = self.allowed
        if peer is None:
            if self.mode == "strict" and client_ip not in _LOOPBACK:
                return self._refuse(
                    PLAINTEXT, "mtls is strict: plaintext from another host is refused"
                )
            if "*" in allowed:
                return None
            return self._refuse(PLAINTEXT, "allow_from names services; this caller has no identity")
        if "*" in allowed:
            return None
        caller = service_of(peer, self.mesh.trust_domain)
        if caller is not None and caller in allowed:
            return None
        if caller is None:
            return self._refuse(
                UNKNOWN, f"allow_from names services; {peer[:200]!r} is none of ours"
            )
        return self._refuse(caller, f"allow_from does not list {caller}")

    def _refuse(self, caller: str, why: str) -> tuple[Reason, str]:
        self.forbidden[caller] = self.forbidden.get(caller, 0) + 1
        return Reason.FORBIDDEN, why
