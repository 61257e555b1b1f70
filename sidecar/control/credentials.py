"""A workload certificate as the sidecar holds it, and the checks it passes before it is used.

Pure functions of their arguments and a wall time: the identity manager (``identity``) calls
them, tests call them on any time they like. A certificate the control plane sends is used
only if it is for the key the sidecar made, chains to a root of the trust bundle, names the
identity asked for and is valid now; otherwise ``CertificateRejected`` says which of these
failed (its ``reason``) and why.

Everything here is the standard library's ``ssl`` (OpenSSL), never ``cryptography`` (about
10 MB a long-running sidecar would hold; only the child that makes keys loads it:
``keygen``). OpenSSL proves the key fits the certificate when it loads them together, and
verifies the chain in a TLS handshake between the sidecar's own new contexts, in memory
(``sidecar.tls.check_pair``): the very check every peer will make, but for the validity
times, which are judged here on the caller's clock.
"""

from __future__ import annotations

import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Final

from control_plane.wire.pem import certificates, fingerprint
from sidecar.errors import CertificateRejected
from sidecar.tls import check_pair, mesh_contexts, spiffe_id_of

MAX_CHAIN: Final = 8
"""certificates a chain may hold (the workload's and its intermediates)"""


@dataclass(frozen=True, slots=True)
class Credential:
    """A certificate in force: its chain (PEM), its key (PEM, in memory only), what it says."""

    key_pem: bytes = field(repr=False)
    chain_pem: bytes
    identity: str
    serial: int
    not_before: float
    """wall-clock seconds since 1970"""
    not_after: float
    """wall-clock seconds since 1970"""

    def __repr__(self) -> str:  # never the key
        return f"<Credential {self.identity} serial {self.serial:x} until {self.not_after:.0f}>"


def fingerprints(bundle: tuple[str, ...]) -> list[str]:
    """Hex SHA-256 of each root of a trust bundle (checked when the table was parsed), as the
    control plane's API names them."""
    return [fingerprint(der) for pem in bundle for der in certificates(pem)[:1]]


def accept(
    chain_text: str,
    *,
    key_pem: bytes,
    identity: str,
    bundle: tuple[str, ...],
    now: float,
) -> Credential:
    """The certificate the control plane answered a CSR with, checked in order: it is PEM
    certificates, holds ``key_pem``'s public half, chains to a root of ``bundle``, names
    ``identity`` and is valid at ``now``; CertificateRejected otherwise."""
    _check_pem(chain_text)
    chain_pem = chain_text.encode()
    leaf = _verified_leaf(chain_pem, key_pem, bundle)
    named = spiffe_id_of(leaf)
    if named != identity:
        shown = repr(named[:200]) if named else "no SPIFFE ID"
        raise CertificateRejected(
            "wrong_identity", f"the certificate names {shown}, not {identity}"
        )
    not_before, not_after = _validity(leaf)
    check_valid(not_before, not_after, now)
    return Credential(
        key_pem=key_pem,
        chain_pem=chain_pem,
        identity=identity,
        serial=int(str(leaf.get("serialNumber", "0")), 16),
        not_before=not_before,
        not_after=not_after,
    )


def chains_to(chain_pem: bytes, key_pem: bytes, bundle: tuple[str, ...]) -> bool:
    """Whether a certificate in force still chains to a root of ``bundle`` (a new one)."""
    try:
        _verified_leaf(chain_pem, key_pem, bundle)
    except CertificateRejected:
        return False
    return True


def _check_pem(chain_text: str) -> None:
    try:
        chain = certificates(chain_text)
    except ValueError as e:
        raise CertificateRejected("invalid", f"the chain is not PEM certificates: {e}") from None
    if not chain:
        raise CertificateRejected("invalid", "the chain is not PEM certificates: none found")
    if len(chain) > MAX_CHAIN:
        raise CertificateRejected("invalid", f"the chain holds {len(chain)} certificates")


def _verified_leaf(chain_pem: bytes, key_pem: bytes, bundle: tuple[str, ...]) -> dict[str, Any]:
    """The leaf as OpenSSL decoded it once it loaded it with the key and verified the chain
    (times aside) to ``bundle``."""
    if not bundle:
        raise CertificateRejected("untrusted", "there is no trust bundle to check it against")
    try:
        server, client, _ = mesh_contexts(chain_pem, key_pem, list(bundle), check_time=False)
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            raise CertificateRejected(
                "wrong_key",
                "the certificate is not for the key of the CSR in flight (a late answer?)",
            ) from None
        raise CertificateRejected("invalid", f"OpenSSL cannot load it: {e}") from None
    try:
        return check_pair(server, client)
    except ssl.SSLCertVerificationError as e:
        raise CertificateRejected(
            "untrusted",
            f"the certificate does not chain to a root of the trust bundle ({e.verify_message})",
        ) from None
    except ssl.SSLError as e:
        raise CertificateRejected("invalid", f"a handshake with it fails: {e}") from None


def _validity(certificate: dict[str, Any]) -> tuple[float, float]:
    return (
        float(ssl.cert_time_to_seconds(certificate["notBefore"])),
        float(ssl.cert_time_to_seconds(certificate["notAfter"])),
    )


def check_valid(not_before: float, not_after: float, now: float) -> None:
    """CertificateRejected unless ``now`` is within [not_before, not_after)."""
    if now < not_before:
        raise CertificateRejected(
            "invalid",
            f"the certificate is valid only from {_utc(not_before)} UTC (this host's clock is "
            "behind?)",
        )
    if now >= not_after:
        raise CertificateRejected("expired", f"the certificate expired at {_utc(not_after)}")


def _utc(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))
