"""The child process of the sidecar's ``keygen``: a new ECDSA P-256 key and a CSR for one
SPIFFE ID, made by ``identity.make_csr`` (``identity.key_and_csr_pem``).

    python -P -m control_plane.wire.keymaker spiffe://cluster.local/ns/default/svc/catalog

writes the key (PKCS #8, PEM) and then the CSR (PEM) to its standard output, a pipe to the
sidecar, and exits. It lives here, beside the code that makes CSRs, so that the sidecar's
package never imports ``cryptography`` (import-linter holds it to that).
"""

from __future__ import annotations

import sys

USAGE = (
    "usage: python -m control_plane.wire.keymaker spiffe://TRUST-DOMAIN/ns/NAMESPACE/svc/SERVICE"
)
MAX_ID = 2048
"""characters of a SPIFFE ID (the spec's limit); the sidecar checked it closer"""


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].startswith("spiffe://") or len(argv[0]) > MAX_ID:
        print(USAGE, file=sys.stderr)
        return 2
    from control_plane.wire.identity import key_and_csr_pem

    sys.stdout.buffer.write(key_and_csr_pem(argv[0]))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
