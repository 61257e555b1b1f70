"""TLS: towards an ``https://`` control plane (the context that verifies its certificate), and
between sidecars (mesh TLS: the credentials the data path reads, and the peer's identity)."""

from __future__ import annotations

import os
import ssl

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


def mesh_contexts(
    chain_pem: bytes, key_pem: bytes, bundle: list[str]
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts for mesh TLS: TLS 1.3 only, ALPN ``http/1.1``, the peer's
    certificate required and verified against ``bundle`` (PEM roots) on both sides, with no
    host name check (the caller checks the peer's SPIFFE ID: ``peer_identity``).

    The key is handed to OpenSSL through an anonymous in-memory file (``memfd``): Python's
    ``ssl`` loads keys only from a path, and a workload key must never reach a disk.
    ``ssl.SSLError`` when the material does not fit together."""
    contexts = []
    for purpose in (ssl.PROTOCOL_TLS_SERVER, ssl.PROTOCOL_TLS_CLIENT):
        ctx = ssl.SSLContext(purpose)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.set_alpn_protocols([MESH_ALPN])
        ctx.load_verify_locations(cadata="\n".join(bundle))
        _load_chain(ctx, chain_pem, key_pem)
        contexts.append(ctx)
    return contexts[0], contexts[1]


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
    if not cert:
        return None
    sans = cert.get("subjectAltName", ())
    names = [
        pair[1]
        for pair in sans
        if isinstance(pair, tuple)
        and pair[0] == "URI"
        and isinstance(pair[1], str)
        and pair[1].startswith("spiffe://")
    ]
    return names[0] if len(names) == 1 else None
