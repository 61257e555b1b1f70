"""The mesh's certificate authority: workload certificates with SPIFFE identities (issue 15).

The first piece of mutual TLS, and only the cryptography (the ``cryptography`` library, no
hand-written ASN.1): make a root or load one handed to us (``--ca-cert``/``--ca-key``: a
user's own PKI or cert-manager signs it as an intermediate), and sign a workload's CSR for the
service its token acts for, whatever identity the CSR asks for. ``trust`` keeps it in the
store and signs the CSRs sidecars send over their streams.

A workload certificate names exactly one identity, a SPIFFE ID in its URI SAN:
``spiffe://<trust domain>/ns/<namespace>/svc/<service>`` (``default`` for an instance with no
namespace). It is an end-entity certificate for both TLS client and server, valid 24 h by
default (a sidecar renews at two thirds), never past the CA's own end.
"""

from __future__ import annotations

import datetime
import re
import secrets
from dataclasses import dataclass
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.wire import WireError, check_service_name
from control_plane.wire.identity import (
    MAX_CSR_BYTES,
    TRUST_DOMAIN,
    check_trust_domain,
    identity_of,
    is_ca,
    make_csr,
    spiffe_id,
)

__all__ = [
    "MAX_CSR_BYTES",
    "TRUST_DOMAIN",
    "Authority",
    "CAError",
    "Refused",
    "identity_of",
    "make_csr",
    "spiffe_id",
]

WORKLOAD_TTL = 24 * 3600.0
"""seconds a workload certificate is valid"""
ROOT_TTL = 10 * 365 * 24 * 3600.0
"""seconds a root this control plane makes is valid"""
SKEW = 60.0
"""seconds a certificate is valid before it is signed: clocks of hosts differ"""
_NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


class CAError(Exception):
    """CA material that cannot be used, and why; ``field`` names the flag it came from."""

    def __init__(self, message: str, field: str = "ca_cert") -> None:
        super().__init__(message)
        self.field = field


RefusalReason = Literal["too_large", "invalid", "identity"]


class Refused(Exception):
    """A CSR this CA will not sign, and why; ``reason`` is a metric label."""

    def __init__(self, message: str, reason: RefusalReason = "invalid") -> None:
        super().__init__(message)
        self.reason: RefusalReason = reason


def _trust_domain(trust_domain: str) -> str:
    try:
        return check_trust_domain(trust_domain)
    except WireError as e:
        raise CAError(f"trust domain: {e.message}", "trust_domain") from None


def _utc(seconds: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(seconds, datetime.UTC)


@dataclass(frozen=True, slots=True)
class Authority:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    trust_domain: str = TRUST_DOMAIN
    parents: tuple[x509.Certificate, ...] = ()
    """the intermediates above a loaded intermediate CA, up to (not including) its root"""

    @property
    def self_signed(self) -> bool:
        """A root (its own issuer), not an intermediate of someone else's PKI."""
        return self.certificate.issuer == self.certificate.subject

    @classmethod
    def create(cls, now: float, trust_domain: str = TRUST_DOMAIN) -> Authority:
        """A new root: ECDSA P-256, valid ``ROOT_TTL`` from ``now`` (wall clock)."""
        _trust_domain(trust_domain)
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "meshlet"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"meshlet root {trust_domain}"),
            ]
        )
        public = key.public_key()
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_utc(now - SKEW))
            .not_valid_after(_utc(now + ROOT_TTL))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(_CA_USAGE, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(certificate, key, trust_domain)

    @classmethod
    def load(
        cls, cert_pem: bytes, key_pem: bytes, now: float, trust_domain: str = TRUST_DOMAIN
    ) -> Authority:
        """A CA handed to us (a root, or an intermediate of the user's PKI, its file maybe
        followed by the intermediates above it): CAError unless it is a CA certificate valid
        now, with an ECDSA key that matches it."""
        _trust_domain(trust_domain)
        try:
            certificate, *above = x509.load_pem_x509_certificates(cert_pem)
        except ValueError as e:
            raise CAError(f"the CA certificate is not a PEM certificate: {e}") from None
        try:
            key = serialization.load_pem_private_key(key_pem, password=None)
        except (ValueError, TypeError) as e:
            raise CAError(
                f"the CA key is not an unencrypted PEM private key: {e}", "ca_key"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"the CA key must be ECDSA, not {type(key).__name__}", "ca_key")
        if not is_ca(certificate):
            raise CAError("the CA certificate is not a CA (basicConstraints CA:TRUE)")
        if key.public_key().public_numbers() != _ec_numbers(certificate):
            raise CAError("the CA key does not match the CA certificate", "ca_key")
        if not certificate.not_valid_before_utc <= _utc(now) < certificate.not_valid_after_utc:
            raise CAError(
                f"the CA certificate is valid from {certificate.not_valid_before_utc:%Y-%m-%d} "
                f"to {certificate.not_valid_after_utc:%Y-%m-%d}, not now"
            )
        parents = tuple(c for c in above if c.issuer != c.subject)
        return cls(certificate, key, trust_domain, parents)

    def pem(self) -> tuple[bytes, bytes]:
        """The certificate (with the intermediates above it) and its key, PEM (the key
        unencrypted: for the store only)."""
        key = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return self.certificate.public_bytes(serialization.Encoding.PEM) + self.chain(), key

    def chain(self) -> bytes:
        """What a workload certificate is sent with: the intermediates from this CA up to
        (not including) the root; nothing when this CA is the root."""
        intermediates = () if self.self_signed else (self.certificate, *self.parents)
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in intermediates)

    def sign(
        self,
        csr_pem: bytes,
        *,
        service: str,
        namespace: str,
        now: float,
        ttl: float = WORKLOAD_TTL,
    ) -> x509.Certificate:
        """A workload certificate for ``service`` (the one the caller's token acts for) from
        a CSR signed by its ECDSA P-256 key. The certificate names only the identity this CA
        decides; a CSR that asks for another (a URI SAN) is Refused, as is one that is not a
        valid, self-signed P-256 CSR."""
        check_service_name(service)
        if namespace and _NAMESPACE.fullmatch(namespace) is None:
            raise Refused(f"namespace {namespace[:80]!r} is not a Kubernetes namespace name")
        identity = spiffe_id(self.trust_domain, namespace, service)
        csr = _parse_csr(csr_pem)
        asked = _asked_identities(csr)
        if asked and asked != [identity]:
            raise Refused(
                f"the CSR asks for {', '.join(a[:120] for a in asked)}; "
                f"this token may only have {identity}",
                "identity",
            )
        public = csr.public_key()
        end = min(_utc(now + ttl), self.certificate.not_valid_after_utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(_utc(now - SKEW))
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_WORKLOAD_USAGE, critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )


def _key_usage(*, signs_certificates: bool) -> x509.KeyUsage:
    """Digital signatures (ECDSA TLS); a CA's also certificates and CRLs."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


_CA_USAGE = _key_usage(signs_certificates=True)
_WORKLOAD_USAGE = _key_usage(signs_certificates=False)


def _ec_numbers(certificate: x509.Certificate) -> ec.EllipticCurvePublicNumbers | None:
    public = certificate.public_key()
    return public.public_numbers() if isinstance(public, ec.EllipticCurvePublicKey) else None


def _parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    if len(csr_pem) > MAX_CSR_BYTES:
        raise Refused(f"the CSR is over {MAX_CSR_BYTES} bytes", "too_large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise Refused(f"the CSR is not a PEM certificate request: {e}") from None
    public = csr.public_key()
    if not isinstance(public, ec.EllipticCurvePublicKey) or public.curve.name != "secp256r1":
        raise Refused("the CSR's key must be ECDSA P-256")
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise Refused("the CSR's signature does not match its key")
    return csr


def _asked_identities(csr: x509.CertificateSigningRequest) -> list[str]:
    try:
        names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    except ValueError as e:
        raise Refused(f"the CSR's extensions do not parse: {e}") from None
    return [n.value if isinstance(n.value, str) else repr(n.value) for n in names.value]
