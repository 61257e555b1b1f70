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
"""the one protocol mesh TLS carries (a second codec will add its own)"""


class MeshTls:
    """The sidecar's mesh credentials, as the data path reads them at each handshake.

    The identity manager replaces ``server`` and ``client`` whole when its certificate is
    rotated or the trust bundle changes; a connection keeps the context it was made with, so
    a rotation drops none. Until the first certificate both are None: the sidecar then neither
    accepts nor originates mesh TLS.
    """

    __slots__ = ("client", "identity", "server", "trust_domain")

    def __init__(self) -> None:
        self.trust_domain = ""
        #: this sidecar's SPIFFE ID ("" until its first certificate)
        self.identity = ""
        self.server: ssl.SSLContext | None = None
        self.client: ssl.SSLContext | None = None


NO_CHECK_TIME: Final = 0x200000
"""OpenSSL's ``X509_V_FLAG_NO_CHECK_TIME`` (``ssl.VerifyFlags`` does not name it): verify a
chain's signatures, names and constraints but not the validity times (``check_pair``: the
sidecar judges those on its own clock)"""


def mesh_contexts(
    chain_pem: bytes, key_pem: bytes, bundle: list[str], *, check_time: bool = True
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for mesh TLS: TLS 1.3 only, ALPN ``http/1.1``, the peer's
    certificate required and verified against ``bundle`` (PEM roots) on both sides, with no
    host name check (the caller checks the peer's SPIFFE ID: ``peer_identity``).
    ``check_time=False`` makes contexts that are only for ``check_pair``.

    The key is handed to OpenSSL through an anonymous in-memory file (``memfd``): Python's
    ``ssl`` loads keys only from a path, and a workload key must never reach a disk.
    ``ssl.SSLError`` when the material does not fit together (``KEY_VALUES_MISMATCH``: the
    certificate is not for the key)."""
    contexts = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        if not check_time:
            ctx.verify_flags |= NO_CHECK_TIME
        ctx.set_alpn_protocols([MESH_ALPN])
        ctx.load_verify_locations(cadata="\n".join(bundle))
        _load_chain(ctx, chain_pem, key_pem)
        contexts.append(ctx)
    return contexts[0], contexts[1]


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
