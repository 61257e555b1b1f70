"""TLS: towards an ``https://`` control plane (the context that verifies its certificate), and
between sidecars (mesh TLS: the credentials the data path reads, and the peer's identity)."""

from __future__ import annotations

import os
import ssl
from typing import Any, Final

from sidecar.errors import ConfigError


def client_context(ca_file: str) -> ssl.SSLContext:
    """A context that verifies the server's certificate and host name against the PEM bundle
    ``ca_file`` only (as ``curl --cacert`` does); with no file, against the system's trust
    store. A file that cannot be read or holds no certificate raises ConfigError naming
    ``ca_file``."""
    if not ca_file:
        return ssl.create_default_context()
    try:
        return ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as e:
        raise ConfigError(
            "ca_file", f"{ca_file}: no PEM certificate could be loaded ({e.reason or e})"
        ) from None
    except OSError as e:
        raise ConfigError("ca_file", f"{ca_file}: {e.strerror or e}") from None


# -- mesh TLS between sidecars (issue 15) ------------------------------------------------------

MESH_ALPN = "http/1.1"
"""the protocol mesh TLS carries by default (and when a peer offers no ALPN)"""
MESH_ALPN_H2 = "h2"
"""HTTP/2 over mesh TLS: offered by the inbound listener, and by pools that call over HTTP/2"""


#: (server, client, client_h2): what ``mesh_contexts`` makes, ``MeshTls`` holds
MeshContexts = tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]


class MeshTls:
    """The sidecar's mesh credentials, as the data path reads them at each handshake.

    The identity manager replaces ``server``, ``client`` and ``client_h2`` whole when its
    certificate is rotated or the trust bundle changes; a connection keeps the context it was
    made with, so a rotation drops none. Until the first certificate all are None: the sidecar
    then neither accepts nor originates mesh TLS.
    """

    __slots__ = ("client", "client_h2", "identity", "server", "trust_domain")

    def __init__(self) -> None:
        self.trust_domain = ""
        #: this sidecar's SPIFFE ID ("" until its first certificate)
        self.identity = ""
        #: inbound: offers ALPN ``h2`` and ``http/1.1`` (the client's choice among them)
        self.server: ssl.SSLContext | None = None
        #: outbound HTTP/1.1: offers ``http/1.1``
        self.client: ssl.SSLContext | None = None
        #: outbound HTTP/2: offers ``h2``, then ``http/1.1`` (a sidecar without HTTP/2 over
        #: TLS picks it, and the pool falls back to HTTP/1.1: ``pool.Pool``)
        self.client_h2: ssl.SSLContext | None = None

    def put(self, contexts: MeshContexts | None, identity: str) -> None:
        """Replace the contexts and the identity whole (None: no mesh TLS)."""
        if contexts is None:
            self.server = self.client = self.client_h2 = None
        else:
            self.server, self.client, self.client_h2 = contexts
        self.identity = identity


NO_CHECK_TIME: Final = 0x200000
"""OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME`` (``ssl.VerifyFlags`` does not name it): verify a
chain's signatures, names and constraints but not the validity times (``check_pair``: the
sidecar judges those on its own clock)"""


SESSION_TICKETS: Final = 1
"""TLS 1.3 session tickets the inbound sends after a handshake, not OpenSSL's default two: a
pool resumes only the last session it was given, once. OpenSSL 3.0 copies the session, the
client's certificate with it, through DER for each ticket: the second one cost the inbound
14 % of the instructions of a new connection (handshake, one request, close)."""


def mesh_contexts(
    chain_pem: bytes, key_pem: bytes, bundle: list[str], *, check_time: bool = True
) -> MeshContexts:
    """(server, client, client_h2) contexts for mesh TLS: TLS 1.3 only, the peer's
    certificate required and verified against ``bundle`` (PEM roots) on both sides, with no
    host name check (the caller checks the peer's SPIFFE ID: ``peer_identity``); the server
    sends ``SESSION_TICKETS`` tickets a handshake. ALPN: the server offers ``h2`` and
    ``http/1.1`` (OpenSSL picks the first of its own list the client offers too), ``client``
    offers ``http/1.1``, ``client_h2`` offers ``h2`` then ``http/1.1``. ``check_time=False``
    makes contexts that are only for ``check_pair``.

    The key is handed to OpenSSL through an anonymous in-memory file (``memfd``): Python's
    ``ssl`` loads keys only from a path, and a workload key must never reach a disk.
    ``ssl.SSLError`` when the material does not fit together (``KEY_VALUES_MISMATCH``: the
    certificate is not for the key)."""
    contexts = []
    for purpose, alpn in (
        (ssl.PROTOCOL_TLS_SERVER, [MESH_ALPN_H2, MESH_ALPN]),
        (ssl.PROTOCOL_TLS_CLIENT, [MESH_ALPN]),
        (ssl.PROTOCOL_TLS_CLIENT, [MESH_ALPN_H2, MESH_ALPN]),
    ):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not check_time:
            ctx.verify_flags |= NO_CHECK_TIME
        ctx.set_alpn_protocols(alpn)
        if purpose == ssl.PROTOCOL_TLS_SERVER:
            ctx.num_tickets = SESSION_TICKETS
        ctx.load_verify_locations(cadata="\n".join(bundle))
        _load_chain(ctx, chain_pem, key_pem)
        contexts.append(ctx)
    return contexts[0], contexts[1], contexts[2]


HANDSHAKE_ROUNDS: Final = 8
"""flights an in-memory handshake may take (TLS 1.3 takes three)"""


def check_pair(server: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, Any]:
    """A TLS handshake between the two contexts in memory (no socket), as two sidecars
    holding them would make it: each verifies the other's chain against its trust bundle,
    as OpenSSL does at every real handshake. Returns the server's certificate as the client
    decoded it (``SSLSocket.getpeercert``); ``ssl.SSLCertVerificationError`` when either
    refuses the other's chain, ``ssl.SSLError`` for any other failure."""
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client.wrap_bio(c_in, c_out, server_side=False)
    tls_server = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(HANDSHAKE_ROUNDS):
        done = 0
        for side, out, other in ((tls_client, c_out, s_in), (tls_server, s_out, c_in)):
            try:
                side.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
            other.write(out.read())
        if done == 2:
            return tls_client.getpeercert() or {}
    raise ssl.SSLError(f"an in-memory handshake did not finish in {HANDSHAKE_ROUNDS} flights")


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    fd = os.memfd_create("meshlet-identity", os.MFD_CLOEXEC)
    try:
        os.write(fd, chain_pem + b"\n" + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def peer_identity(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> str | None:
    """The SPIFFE ID of a verified peer: its certificate's one ``spiffe://`` URI SAN, or None
    (no certificate, none, or several)."""
    cert = ssl_object.getpeercert()
    return spiffe_id_of(cert) if cert else None


def spiffe_id_of(certificate: dict[str, Any]) -> str | None:
    """The SPIFFE ID a certificate as ``getpeercert`` decodes it names: its one
    ``spiffe://`` URI SAN, or None (none, or several)."""
    sans = certificate.get("subjectAltName", ())
    names = [
        pair[1]
        for pair in sans
        if isinstance(pair, tuple)
        and pair[0] == "URI"
        and isinstance(pair[1], str)
        and pair[1].startswith("spiffe://")
    ]
    return names[0] if len(names) == 1 else None
