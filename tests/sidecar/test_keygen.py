"""The key maker (``sidecar.control.keygen``): a real child process makes a P-256 key and a
CSR for the SPIFFE ID asked for, and hands both back over its pipe; what is not a key and a
CSR, or a child that fails, is refused naming why. The checks of what the control plane sends
back with ``ssl`` alone (``credentials``) are here too: each reason on its own."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from control_plane.ca import Authority
from control_plane.wire import Csr
from control_plane.wire.identity import make_csr
from sidecar.clock import wall
from sidecar.control import keygen
from sidecar.control.credentials import accept, chains_to, fingerprints
from sidecar.errors import CertificateRejected
from tests.sidecar.test_identity import forged, key_pem, pem

ME = "spiffe://cluster.local/ns/shop/svc/catalog"


async def test_a_child_makes_a_p256_key_and_a_csr_for_the_identity() -> None:
    key_text, csr_text = await keygen.make(ME)
    key = serialization.load_pem_private_key(key_text, password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.curve.name == "secp256r1"
    csr = x509.load_pem_x509_csr(csr_text)
    assert csr.is_signature_valid
    assert csr.public_key() == key.public_key()  # the CSR is for the key handed back
    names = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert names.value.get_values_for_type(x509.UniformResourceIdentifier) == [ME]
    again, _ = await keygen.make(ME)
    assert again != key_text  # a new key every time


def test_the_child_sees_none_of_the_sidecars_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MESHLET_TOKEN", "s3cret")
    monkeypatch.setenv("MESHLET_TEST_KEEP", "x")
    env = keygen.child_environment()
    assert not [k for k in env if k.startswith("MESHLET_")]
    assert env["PATH"] == os.environ["PATH"]


async def test_what_is_not_a_spiffe_id_starts_no_child() -> None:
    with pytest.raises(CertificateRejected) as e:
        await keygen.make("spiffe://cluster.local/ns/shop/svc/../x")
    assert e.value.reason == "keygen"
    assert "not a SPIFFE ID" in str(e.value)


def test_the_child_refuses_bad_arguments_with_exit_2() -> None:
    done = subprocess.run(
        [sys.executable, "-P", "-m", keygen.MODULE, "not-an-id"],
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == b""
    assert b"usage" in done.stderr


@pytest.mark.parametrize(
    "out",
    [
        b"",
        b"junk",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",  # no CSR
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_output_that_is_not_a_key_and_a_csr_is_refused(out: bytes) -> None:
    with pytest.raises(CertificateRejected) as e:
        keygen.parse_output(out)
    assert e.value.reason == "keygen"
    assert f"wrote {len(out)} bytes" in str(e.value)


def test_trailing_output_is_refused() -> None:
    key, csr = make_csr(ME)
    good = key_pem(key) + csr
    assert keygen.parse_output(good) == (key_pem(key), csr)
    with pytest.raises(CertificateRejected):
        keygen.parse_output(good + b"more")


# -- the checks of a certificate, with ssl alone ------------------------------------------------


def signed(ca: Authority, now: float) -> tuple[bytes, Csr, str]:
    """A key (PEM), its CSR, and ``ca``'s certificate for it (PEM)."""
    key, request = make_csr(ME)
    csr = Csr(request.decode())
    certificate = ca.sign(request, service="catalog", namespace="shop", now=now)
    return key_pem(key), csr, pem(certificate)


def test_a_good_certificate_is_accepted_with_what_it_says() -> None:
    now = wall()
    ca = Authority.create(now)
    key, _, chain = signed(ca, now)
    bundle = (pem(ca.certificate),)
    credential = accept(chain, key_pem=key, identity=ME, bundle=bundle, now=now)
    leaf = x509.load_pem_x509_certificate(chain.encode())
    assert credential.identity == ME
    assert credential.serial == leaf.serial_number
    assert credential.not_before == leaf.not_valid_before_utc.timestamp()
    assert credential.not_after == leaf.not_valid_after_utc.timestamp()
    assert "PRIVATE" not in repr(credential)
    assert chains_to(credential.chain_pem, key, bundle)
    assert not chains_to(credential.chain_pem, key, (pem(Authority.create(now).certificate),))
    assert fingerprints(bundle) == [ca.certificate.fingerprint(hashes.SHA256()).hex()]


def test_each_check_refuses_with_its_reason() -> None:
    now = wall()
    ca, foreign = Authority.create(now), Authority.create(now)
    key, csr, chain = signed(ca, now)
    other_key, _, _ = signed(ca, now)
    bundle = (pem(ca.certificate),)

    def reason(
        chain: str, key: bytes = key, at: float = now, roots: tuple[str, ...] = bundle
    ) -> str:
        with pytest.raises(CertificateRejected) as e:
            accept(chain, key_pem=key, identity=ME, bundle=roots, now=at)
        return e.value.reason

    assert reason("not PEM") == "invalid"
    assert reason(chain * 9) == "invalid"  # over MAX_CHAIN
    assert reason(chain, key=other_key) == "wrong_key"
    assert reason(chain, roots=(pem(foreign.certificate),)) == "untrusted"
    assert reason(chain, roots=()) == "untrusted"
    assert reason(forged(ca, csr, "other", now).chain) == "wrong_identity"
    assert reason(chain, at=now - 3600) == "invalid"  # not valid yet
    assert reason(chain, at=now + 2 * 86400) == "expired"
