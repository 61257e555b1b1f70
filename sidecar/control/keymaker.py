"""The child process of ``keygen``: a new ECDSA P-256 key and a CSR for one SPIFFE ID.

    python -P -m sidecar.control.keymaker spiffe://cluster.local/ns/default/svc/catalog

writes the key (PKCS #8, PEM) and then the CSR (PEM) to its standard output, a pipe to the
sidecar, and exits. It imports ``cryptography`` and nothing of the mesh's (every import is
start-up time the sidecar waits for); the CSR is the one ``control_plane.wire.identity``
makes: an empty subject and the identity as its one URI SAN, critical.
"""

from __future__ import annotations

import sys

USAGE = "usage: python -m sidecar.control.keymaker spiffe://TRUST-DOMAIN/ns/NAMESPACE/svc/SERVICE"
MAX_ID = 2048
"""characters of a SPIFFE ID (the spec's limit); the sidecar checked it closer"""


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("spiffe://") or len(argv[0]) > MAX_ID:
        print(USAGE, file=sys.stderr)
        return 2
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(argv[0])]),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    sys.stdout.buffer.write(pem + csr.public_bytes(serialization.Encoding.PEM))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
