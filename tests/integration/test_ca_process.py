"""The mesh's CA in a real control-plane process (issue 15): it survives a restart, a CA
handed to it with --ca-cert becomes the signing one, and a bad one stops the start."""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509

from control_plane.ca import Authority
from tests.processes import ControlPlane

Start = Callable[..., ControlPlane]

pytestmark = pytest.mark.slow


def signing_ca(cp: ControlPlane) -> x509.Certificate:
    """``GET /v1/ca`` (PEM, not JSON)."""
    request = urllib.request.Request(
        cp.url + "/v1/ca", headers={"Authorization": f"Bearer {cp.admin_token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as r:
        assert r.status == 200
        return x509.load_pem_x509_certificate(r.read())


def roots(cp: ControlPlane) -> dict[str, bool]:
    status, body = cp.call("GET", "/v1/trust-bundle")
    assert status == 200, body
    return {root["sha256"]: root["signing"] for root in body["roots"]}


def test_the_ca_survives_a_restart(control_plane: Start, tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'm.db'}"
    cp = control_plane("--store", db)
    made, bundle = signing_ca(cp), roots(cp)
    assert list(bundle.values()) == [True]
    assert cp.stop() == 0
    assert "PRIVATE KEY" not in cp.log()

    cp = control_plane("--store", db)
    assert signing_ca(cp) == made
    assert roots(cp) == bundle
    assert cp.stop() == 0


def test_a_given_ca_signs_and_the_made_root_stays_until_deleted(
    control_plane: Start, tmp_path: Path
) -> None:
    db = f"sqlite:///{tmp_path / 'm.db'}"
    cp = control_plane("--store", db)
    made = roots(cp)
    assert cp.stop() == 0
    given = Authority.create(time.time())
    cert, key = given.pem()
    (tmp_path / "ca.crt").write_bytes(cert)
    (tmp_path / "ca.key").write_bytes(key)
    flags = ["--ca-cert", str(tmp_path / "ca.crt"), "--ca-key", str(tmp_path / "ca.key")]
    cp = control_plane("--store", db, *flags)
    assert signing_ca(cp) == given.certificate
    (old,) = made
    assert roots(cp)[old] is False  # trusted still: workloads rotate onto the new CA first
    assert cp.call("DELETE", f"/v1/trust-bundle/{old}")[0] == 204
    assert cp.stop() == 0
    cp = control_plane("--store", db)  # no flags: the store's CA, the given one
    assert signing_ca(cp) == given.certificate
    assert list(roots(cp).values()) == [True]
    assert cp.stop() == 0


def test_a_bad_ca_file_fails_at_start_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("not a certificate\n")
    argv = [sys.executable, "-m", "control_plane", "--listen", "127.0.0.1:0", "--store", "memory"]
    flags = ["--ca-cert", str(tmp_path / "ca.crt"), "--ca-key", str(tmp_path / "ca.crt")]
    proc = subprocess.run([*argv, *flags], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "--ca-cert: the CA certificate is not a PEM certificate" in proc.stderr
