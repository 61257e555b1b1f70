"""The mesh's CA (issue 15, its first piece): roots made or loaded, workload certificates
signed for the token's service only, and two of them in a real mutual TLS handshake."""

from __future__ import annotations

import asyncio
import datetime
import ssl
import time
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from control_plane.ca import (
    WORKLOAD_TTL,
    Authority,
    CAError,
    Refused,
    identity_of,
    make_csr,
    spiffe_id,
)

NOW = time.time()
CATALOG = spiffe_id("cluster.local", "shop", "catalog")


@pytest.fixture(scope="module")
def ca() -> Authority:
    return Authority.create(NOW)


def test_a_workload_certificate_names_the_tokens_service_and_lasts_a_day(ca: Authority) -> None:
    key, csr = make_csr(CATALOG)
    cert = ca.sign(csr, service="catalog", namespace="shop", now=NOW)
    assert identity_of(cert) == CATALOG == "spiffe://cluster.local/ns/shop/svc/catalog"
    assert cert.issuer == ca.certificate.subject
    assert cert.public_key() == key.public_key()
    lasts = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lasts == datetime.timedelta(seconds=WORKLOAD_TTL + 60)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca is False
    public = ca.certificate.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    assert cert.signature_hash_algorithm is not None
    public.verify(
        cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm)
    )
    # no namespace: "default"; a CSR that asks for nothing gets the token's identity
    _, bare = make_csr("spiffe://cluster.local/ns/default/svc/orders")
    assert identity_of(ca.sign(bare, service="orders", namespace="", now=NOW)) == (
        "spiffe://cluster.local/ns/default/svc/orders"
    )


def test_a_csr_for_another_service_is_refused(ca: Authority) -> None:
    _, csr = make_csr(spiffe_id("cluster.local", "shop", "payments"))
    with pytest.raises(Refused, match=r"asks for spiffe://cluster.local/ns/shop/svc/payments"):
        ca.sign(csr, service="catalog", namespace="shop", now=NOW)
    _, other_ns = make_csr(spiffe_id("cluster.local", "other", "catalog"))
    with pytest.raises(Refused, match=r"may only have spiffe://cluster\.local/ns/shop/svc/catalog"):
        ca.sign(other_ns, service="catalog", namespace="shop", now=NOW)


def test_bad_csrs_are_refused_naming_why(ca: Authority) -> None:
    with pytest.raises(Refused, match="not a PEM certificate request"):
        ca.sign(b"-----BEGIN junk", service="catalog", namespace="", now=NOW)
    with pytest.raises(Refused, match="over 8192 bytes"):
        ca.sign(b"x" * 9000, service="catalog", namespace="", now=NOW)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    rsa_csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "catalog")]))
        .sign(rsa_key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(Refused, match="ECDSA P-256"):
        ca.sign(rsa_csr, service="catalog", namespace="", now=NOW)
    # a CSR whose signature is not its key's: made with one key, then given another's
    _, csr = make_csr(CATALOG)
    other, _ = make_csr(CATALOG)
    forged = x509.load_pem_x509_csr(csr)
    tampered = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(forged.subject)
        .sign(other, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    # flip a byte of the signature at the end
    broken = tampered[:-3] + bytes([tampered[-3] ^ 1]) + tampered[-2:]
    pem = x509.load_der_x509_csr(broken).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(Refused, match="signature does not match"):
        ca.sign(pem, service="catalog", namespace="", now=NOW)
    with pytest.raises(Refused, match="not a Kubernetes namespace"):
        ca.sign(csr, service="catalog", namespace="Shop!", now=NOW)


def test_a_given_ca_is_loaded_and_bad_ones_are_named(tmp_path: Path) -> None:
    made = Authority.create(NOW, "example.org")
    cert_pem, key_pem = made.pem()
    loaded = Authority.load(cert_pem, key_pem, NOW, "example.org")
    _, csr = make_csr(spiffe_id("example.org", "", "catalog"))
    cert = loaded.sign(csr, service="catalog", namespace="", now=NOW)
    assert identity_of(cert) == "spiffe://example.org/ns/default/svc/catalog"

    other_cert, other_key = Authority.create(NOW).pem()
    with pytest.raises(CAError, match="does not match"):
        Authority.load(cert_pem, other_key, NOW)
    leaf = trustme.CA().issue_cert("x.example")
    leaf_key = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    with pytest.raises(CAError, match="not a CA"):
        Authority.load(leaf.cert_chain_pems[0].bytes(), leaf_key, NOW)
    with pytest.raises(CAError, match="not now"):
        Authority.load(cert_pem, key_pem, NOW + 20 * 365 * 86400)
    with pytest.raises(CAError, match="not a PEM certificate"):
        Authority.load(b"junk", key_pem, NOW)
    with pytest.raises(CAError, match="not an unencrypted PEM private key"):
        Authority.load(other_cert, b"junk", NOW)
    with pytest.raises(CAError, match="trust domain"):
        Authority.create(NOW, "Not A Domain")


def _files(tmp: Path, name: str, ca: Authority, identity: str, service: str) -> Path:
    key, csr = make_csr(identity)
    cert = ca.sign(csr, service=service, namespace="shop", now=NOW)
    (tmp / f"{name}.pem").write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return tmp / f"{name}.pem"


async def test_two_workload_certificates_make_a_mutual_tls_connection(
    ca: Authority, tmp_path: Path
) -> None:
    (tmp_path / "bundle.pem").write_bytes(ca.pem()[0])
    server_pem = _files(tmp_path, "server", ca, CATALOG, "catalog")
    client_pem = _files(tmp_path, "client", ca, spiffe_id("cluster.local", "shop", "web"), "web")

    def context(purpose: ssl.Purpose, pem: Path) -> ssl.SSLContext:
        ctx = ssl.create_default_context(purpose, cafile=tmp_path / "bundle.pem")
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.load_cert_chain(pem)
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = False  # the peer is checked by its SPIFFE ID, not a host name
        return ctx

    seen: list[str | None] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        seen.append(identity_of(x509.load_der_x509_certificate(peer)))
        writer.write(await reader.readline())
        await writer.drain()
        writer.close()

    server_ctx = context(ssl.Purpose.CLIENT_AUTH, server_pem)
    srv = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=server_ctx)
    port = srv.sockets[0].getsockname()[1]
    async with srv:
        client_ctx = context(ssl.Purpose.SERVER_AUTH, client_pem)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        server_cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        assert identity_of(x509.load_der_x509_certificate(server_cert)) == CATALOG
        writer.write(b"ping\n")
        assert await reader.readline() == b"ping\n"
        writer.close()
        # a client whose certificate another CA signed is refused in the handshake
        foreign = Authority.create(NOW)
        stranger = context(
            ssl.Purpose.SERVER_AUTH, _files(tmp_path, "stranger", foreign, CATALOG, "catalog")
        )
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _talk(port, stranger)
    assert seen == ["spiffe://cluster.local/ns/shop/svc/web"]  # the stranger never got in


async def _talk(port: int, ctx: ssl.SSLContext) -> None:
    """One line there and back; ConnectionResetError when the server closes without one."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx)
    try:
        writer.write(b"x\n")
        if not await reader.readline():
            raise ConnectionResetError("closed without an answer")
    finally:
        writer.close()
