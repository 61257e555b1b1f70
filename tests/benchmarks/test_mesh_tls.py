"""bench_proxy's certificates do what its TLS measurements rely on: the two workload
certificates complete a mutual TLS 1.3 handshake against the run's CA, each side verifying the
other, and each names its SPIFFE ID; and the s_time output is read as it prints."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from sidecar.tls import peer_identity
from tests.benchmarks import mesh_tls


def context(pki: mesh_tls.Pki, purpose: ssl.Purpose, chain: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(purpose, cafile=str(pki.ca_cert))
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(chain)
    return ctx


def handshake(client: ssl.SSLObject, server: ssl.SSLObject, pipes: list[ssl.MemoryBIO]) -> None:
    """Move bytes both ways until both sides are done (a few flights)."""
    to_server, to_client, from_client, from_server = pipes
    done: set[str] = set()
    for _ in range(10):
        for name, side in (("client", client), ("server", server)):
            try:
                side.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        if done == {"client", "server"}:
            return
    raise AssertionError(f"handshake stuck; done: {done}")


def test_the_workload_certificates_complete_mutual_tls_against_the_ca(tmp_path: Path) -> None:
    pki = mesh_tls.make_pki(tmp_path)
    assert pki.ca_key.stat().st_mode & 0o077 == 0  # keys are for us only
    assert pki.client.stat().st_mode & 0o077 == 0
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    to_server, to_client, from_client, from_server = pipes
    client = context(pki, ssl.Purpose.SERVER_AUTH, pki.client).wrap_bio(to_client, from_client)
    server = context(pki, ssl.Purpose.CLIENT_AUTH, pki.server).wrap_bio(
        to_server, from_server, server_side=True
    )
    handshake(client, server, pipes)
    assert client.version() == "TLSv1.3"
    assert peer_identity(server) == "spiffe://cluster.local/ns/default/svc/bench-client"
    assert peer_identity(client) == "spiffe://cluster.local/ns/default/svc/bench-server"


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    ours, other = mesh_tls.make_pki(tmp_path / "a"), mesh_tls.make_pki(tmp_path / "b")
    pipes = [ssl.MemoryBIO() for _ in range(4)]
    to_server, to_client, from_client, from_server = pipes
    client = context(ours, ssl.Purpose.SERVER_AUTH, other.client).wrap_bio(to_client, from_client)
    server = context(ours, ssl.Purpose.CLIENT_AUTH, ours.server).wrap_bio(
        to_server, from_server, server_side=True
    )
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(client, server, pipes)


def test_s_time_output_is_read_as_it_prints() -> None:
    out = (
        "Collecting connection statistics for 5 seconds\n"
        "tttttttttt\n\n"
        "1348 connections in 2.87s; 469.69 connections/user sec, bytes read 0\n"
        "1348 connections in 6 real seconds, 0 bytes read per connection\n"
    )
    assert mesh_tls.s_time_connections(out) == 1348
    with pytest.raises(RuntimeError, match="no count"):
        mesh_tls.s_time_connections("ERROR\n")
