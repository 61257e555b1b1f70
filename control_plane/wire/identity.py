"""Workload identities both sides speak: SPIFFE IDs, the CSR a sidecar sends, the roots a
trust bundle holds (issue 15).

The one ``wire`` module that is not standard library only: a CSR and a certificate cannot be
read without ASN.1, and we write none by hand (``cryptography``). Importing it costs a process
about 10 MB, so ``control_plane.wire`` does not import it, and a sidecar loads it only in the
short-lived child that makes its key and CSR (``sidecar.control.keygen``); a table's trust
bundle is checked with ``ssl`` (``wire.pem``).

An identity is ``spiffe://<trust domain>/ns/<namespace>/svc/<service>``, ``default`` for an
instance with no namespace.
"""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.wire.checks import (
    MAX_CSR_BYTES,
    MAX_ROOT_BYTES,
    MAX_ROOTS,
    WireError,
    check_trust_domain,
)
from control_plane.wire.spiffe import TRUST_DOMAIN, parse_spiffe_id, spiffe_id

__all__ = [
    "MAX_CSR_BYTES",
    "MAX_ROOTS",
    "MAX_ROOT_BYTES",
    "TRUST_DOMAIN",
    "check_trust_domain",
    "fingerprint",
    "identity_of",
    "is_ca",
    "make_csr",
    "parse_root",
    "parse_spiffe_id",
    "spiffe_id",
]


def identity_of(certificate: x509.Certificate) -> str | None:
    """The SPIFFE ID a certificate names (its one ``spiffe://`` URI SAN), if any."""
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = names.value.get_values_for_type(x509.UniformResourceIdentifier)
    spiffe = [u for u in uris if u.startswith("spiffe://")]
    return spiffe[0] if len(spiffe) == 1 else None


def make_csr(identity: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new ECDSA P-256 key and a CSR for ``identity`` (as a sidecar makes them: its key
    never leaves it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def key_and_csr_pem(identity: str) -> bytes:
    """``make_csr``'s key (PKCS #8) and CSR, both PEM, one after the other: what the sidecar's
    key maker child hands its parent (``keymaker``)."""
    key, csr_pem = make_csr(identity)
    pkcs8 = serialization.PrivateFormat.PKCS8
    return key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()) + (
        csr_pem
    )


def is_ca(certificate: x509.Certificate) -> bool:
    """Whether it may sign certificates (basicConstraints CA:TRUE)."""
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def fingerprint(certificate: x509.Certificate) -> str:
    """Hex SHA-256 of the DER certificate: how the API names a root."""
    return hashlib.sha256(certificate.public_bytes(serialization.Encoding.DER)).hexdigest()


def parse_root(pem: object, field: str = "pem") -> x509.Certificate:
    """One CA certificate in PEM, at most ``MAX_ROOT_BYTES``; WireError naming ``field``."""
    if not isinstance(pem, str):
        raise WireError(field, "must be a PEM certificate (a string)")
    if len(pem) > MAX_ROOT_BYTES:
        raise WireError(field, f"is over {MAX_ROOT_BYTES} bytes")
    try:
        certificates = x509.load_pem_x509_certificates(pem.encode())
    except ValueError as e:
        raise WireError(field, f"is not a PEM certificate: {str(e)[:120]}") from None
    if len(certificates) != 1:
        raise WireError(field, f"holds {len(certificates)} certificates; give one")
    if not is_ca(certificates[0]):
        raise WireError(field, "is not a CA certificate (basicConstraints CA:TRUE)")
    return certificates[0]
