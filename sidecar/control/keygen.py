"""The sidecar's key maker: a new ECDSA P-256 key and a CSR for its SPIFFE ID, made in a
short-lived child process (``keymaker``) so that the long-running sidecar never loads
``cryptography`` (about 10 MB of RSS for as long as it runs; issue 12).

``make`` starts the child, which writes the key (PKCS #8, PEM) and the CSR (PEM) to its
standard output, an anonymous pipe to the sidecar, and exits: the key reaches no file, no
socket and no other process. The sidecar checks that it got one key and one CSR; it checks
the certificate the control plane sends back with ``ssl`` alone (``credentials``).
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from typing import Final

from control_plane.wire.spiffe import parse_spiffe_id
from sidecar.errors import CertificateRejected

MODULE: Final = "control_plane.wire.keymaker"
MAX_OUTPUT: Final = 16 * 1024
"""bytes the child may write (a P-256 key and its CSR are under 1 KiB)"""
_KEY: Final = re.compile(
    rb"-----BEGIN PRIVATE KEY-----\n[A-Za-z0-9+/=\n]+-----END PRIVATE KEY-----\n"
)
_CSR: Final = re.compile(
    rb"-----BEGIN CERTIFICATE REQUEST-----\n[A-Za-z0-9+/=\n]+-----END CERTIFICATE REQUEST-----\n"
)


async def make(identity: str) -> tuple[bytes, bytes]:
    """A new key and a CSR for ``identity``, each PEM, made by a child process;
    CertificateRejected (reason ``keygen``) says why not. The caller bounds the wait
    (``asyncio.timeout``); a child still running when it is cancelled is killed."""
    if parse_spiffe_id(identity) is None:
        raise _failed(f"not a SPIFFE ID: {identity[:200]!r}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-P",  # (no current directory on sys.path: the sidecar's own modules only)
        "-m",
        MODULE,
        identity,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=child_environment(),
    )
    try:
        out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        said = err.decode("utf-8", "replace").strip().splitlines()[-1:] or ["no message"]
        raise _failed(f"the key maker exited with {proc.returncode}: {said[0][:200]!r}")
    return parse_output(out)


def child_environment() -> dict[str, str]:
    """This process's environment without its ``MESHLET_`` settings: the child needs no
    token (``MESHLET_TOKEN``) nor anything else of the sidecar's to make a key."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}


def parse_output(out: bytes) -> tuple[bytes, bytes]:
    """(key, CSR) from what the child wrote: exactly one PEM key and then one PEM CSR."""
    key, csr = _KEY.match(out), None
    if key is not None:
        csr = _CSR.fullmatch(out, key.end())
    if key is None or csr is None or len(out) > MAX_OUTPUT:
        raise _failed(f"the key maker wrote {len(out)} bytes that are not a key and a CSR")
    return key.group(), csr.group()


def _failed(message: str) -> CertificateRejected:
    return CertificateRejected("keygen", message)
