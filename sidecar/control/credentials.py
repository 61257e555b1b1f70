"""A workload certificate as the sidecar holds it, and the checks it passes before it is used.

Pure functions of their arguments and a wall time: the identity manager (``identity``) calls
them, tests call them on any time they like. A certificate the control plane sends is used
only if it names the identity asked for, holds the key the sidecar made, is valid now and
chains to a root of the trust bundle; otherwise ``CertificateRejected`` says which of these
failed (its ``reason``) and why.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.wire.identity import fingerprint, identity_of, is_ca
from sidecar.errors import CertificateRejected

MAX_CHAIN: Final = 8
"""certificates a chain may hold (the workload's and its intermediates)"""


@dataclass(frozen=True, slots=True)
class Credential:
    """A certificate in force: its chain (PEM), its key (in memory only), what it says."""

    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes
    identity: str
    serial: int
    not_before: float
    """wall-clock seconds since 1970"""
    not_after: float
    """wall-clock seconds since 1970"""

    def __repr__(self) -> str:  # never the key
        return f"<Credential {self.identity} serial {self.serial:x} until {self.not_after:.0f}>"

    def key_pem(self) -> bytes:
        """The key as PEM, for OpenSSL (through a memfd: ``sidecar.tls``), never for a file."""
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


def parse_roots(bundle: tuple[str, ...]) -> list[x509.Certificate]:
    """A table's trust bundle (checked when the table was parsed) as certificates."""
    return [x509.load_pem_x509_certificate(pem.encode()) for pem in bundle]


def fingerprints(roots: list[x509.Certificate]) -> list[str]:
    """Hex SHA-256 of each root, as the control plane's API names them."""
    return [fingerprint(root) for root in roots]


def accept(
    chain_text: str,
    *,
    key: ec.EllipticCurvePrivateKey,
    identity: str,
    roots: list[x509.Certificate],
    now: float,
) -> Credential:
    """The certificate the control plane answered a CSR with, checked in order: it parses,
    names ``identity``, holds ``key``'s public half, is valid at ``now`` and chains to one of
    ``roots``; CertificateRejected otherwise."""
    chain = _parse_chain(chain_text)
    leaf = chain[0]
    named = identity_of(leaf)
    if named != identity:
        shown = repr(named[:200]) if named else "no SPIFFE ID"
        raise CertificateRejected(
            "wrong_identity", f"the certificate names {shown}, not {identity}"
        )
    if leaf.public_key() != key.public_key():
        raise CertificateRejected(
            "wrong_key", "the certificate is not for the key of the CSR in flight (a late answer?)"
        )
    check_valid(leaf, now)
    if not chains_to(chain, roots):
        raise CertificateRejected(
            "untrusted", "the certificate does not chain to a root of the trust bundle"
        )
    return Credential(
        key=key,
        chain_pem=chain_text.encode(),
        identity=identity,
        serial=leaf.serial_number,
        not_before=leaf.not_valid_before_utc.timestamp(),
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


def _parse_chain(chain_text: str) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(chain_text.encode())
    except ValueError as e:
        raise CertificateRejected(
            "invalid", f"the chain is not PEM certificates: {str(e)[:120]}"
        ) from None
    if len(chain) > MAX_CHAIN:
        raise CertificateRejected("invalid", f"the chain holds {len(chain)} certificates")
    return chain


def check_valid(leaf: x509.Certificate, now: float) -> None:
    """CertificateRejected unless ``now`` is within the certificate's validity."""
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)
    if at < leaf.not_valid_before_utc:
        raise CertificateRejected(
            "invalid",
            f"the certificate is valid only from {leaf.not_valid_before_utc:%Y-%m-%d %H:%M:%S}"
            " UTC (this host's clock is behind?)",
        )
    if at >= leaf.not_valid_after_utc:
        raise CertificateRejected(
            "expired", f"the certificate expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}"
        )


def chains_to(chain: list[x509.Certificate], roots: list[x509.Certificate]) -> bool:
    """Whether ``chain[0]`` was signed by a root, directly or through the CA certificates
    after it (in any order). Signatures and names only: the peers' TLS libraries judge the
    rest at each handshake."""
    current, spare = chain[0], [c for c in chain[1:] if is_ca(c)]
    while True:
        if any(_issued_by(current, root) for root in roots):
            return True
        parent = next((c for c in spare if _issued_by(current, c)), None)
        if parent is None:
            return False
        spare.remove(parent)
        current = parent


def _issued_by(certificate: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        certificate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True
