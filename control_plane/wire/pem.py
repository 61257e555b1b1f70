"""PEM certificates read with the standard library alone (``ssl``, ``base64``): a table's
trust bundle as the sidecar checks it, and the fingerprints that name roots.

``identity`` reads certificates with ``cryptography``, which costs a process about 10 MB; a
sidecar holds a table for as long as it runs, so a table's roots are checked here instead:
each is one PEM certificate that OpenSSL loads as a trust anchor and counts as a CA
(``X509_check_ca``: basicConstraints CA:TRUE, as the control plane's own check demands of
every root it takes). No ASN.1 is read here: OpenSSL reads it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import ssl

from control_plane.wire.checks import MAX_ROOT_BYTES, MAX_ROOTS, WireError

_BLOCK = re.compile(
    r"-----BEGIN CERTIFICATE-----\s*?\n([A-Za-z0-9+/=\s]*?)-----END CERTIFICATE-----"
)


def certificates(text: str) -> list[bytes]:
    """The DER bytes of each PEM certificate block in ``text``, in order ([] for none);
    ValueError for a block that is not base64. (Whether the bytes are a certificate is
    OpenSSL's to say, when it loads them.)"""
    found = []
    for block in _BLOCK.finditer(text):
        try:
            found.append(base64.b64decode("".join(block.group(1).split()), validate=True))
        except binascii.Error as e:
            raise ValueError(f"a certificate block is not base64 ({e})") from None
    return found


def fingerprint(der: bytes) -> str:
    """Hex SHA-256 of a DER certificate: how the API names a root."""
    return hashlib.sha256(der).hexdigest()


def check_root(pem: object, field: str = "pem") -> str:
    """One PEM CA certificate, at most ``MAX_ROOT_BYTES``; WireError naming ``field``."""
    if not isinstance(pem, str):
        raise WireError(field, "must be a PEM certificate (a string)")
    if len(pem) > MAX_ROOT_BYTES:
        raise WireError(field, f"is over {MAX_ROOT_BYTES} bytes")
    try:
        blocks = certificates(pem)
    except ValueError as e:
        raise WireError(field, f"is not a PEM certificate: {e}") from None
    if not blocks:
        raise WireError(field, "is not a PEM certificate: no BEGIN CERTIFICATE block")
    if len(blocks) != 1:
        raise WireError(field, f"holds {len(blocks)} certificates; give one")
    store = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        store.load_verify_locations(cadata=blocks[0])
    except ssl.SSLError as e:
        raise WireError(field, f"is not a PEM certificate: {e.reason or e}") from None
    if store.cert_store_stats()["x509_ca"] != 1:
        raise WireError(field, "is not a CA certificate (basicConstraints CA:TRUE)")
    return pem


def parse_bundle(value: object, path: str) -> tuple[str, ...]:
    """A table's trust bundle: at most ``MAX_ROOTS`` PEM CA certificates."""
    if not isinstance(value, list):
        raise WireError(path, "must be an array of PEM certificates")
    if len(value) > MAX_ROOTS:
        raise WireError(path, f"holds {len(value)} roots; at most {MAX_ROOTS}")
    return tuple(check_root(pem, f"{path}[{i}]") for i, pem in enumerate(value))
