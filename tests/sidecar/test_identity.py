"""The identity manager on a fake clock, driven through its inputs (attach, tables, the
control plane's certificates) without sockets: the first certificate, rotation at two thirds,
retries after a refusal or silence, expiry, a new trust bundle, and the certificates it must
never install. The CA is the control plane's own (``control_plane.ca``). Keys and CSRs are
made in this process (``made``), as the sidecar's child process makes them (``keygen``)."""

from __future__ import annotations

import asyncio
import datetime
import re
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from control_plane.ca import Authority
from control_plane.wire import Certificate, Csr, Table
from control_plane.wire.identity import fingerprint, make_csr, spiffe_id
from sidecar.clock import FakeClock, wall
from sidecar.control import keygen
from sidecar.control.identity import (
    ANSWER_TIMEOUT,
    JITTER,
    RETRY_BASE,
    RETRY_CAP,
    ROTATE_AT,
    CsrDue,
    IdentityManager,
    Keygen,
)
from sidecar.errors import CertificateRejected
from sidecar.tls import MeshTls

ME = "spiffe://cluster.local/ns/default/svc/svc"


def pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


def forged(ca: Authority, csr: Csr, service: str, now: float) -> Certificate:
    """A certificate of ``ca`` for the key of ``csr`` that names another service: what a CA
    that signs what it should not would send (``Authority.sign`` refuses to)."""
    request = x509.load_pem_x509_csr(csr.csr.encode())
    at = datetime.datetime.fromtimestamp(now, datetime.UTC)
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    name = x509.UniformResourceIdentifier(spiffe_id(ca.trust_domain, "", service))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, service)]))
        .issuer_name(ca.certificate.subject)
        .public_key(request.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(at - datetime.timedelta(minutes=1))
        .not_valid_after(at + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .add_extension(x509.SubjectAlternativeName([name]), critical=True)
        .sign(ca.key, hashes.SHA256())
    )
    return Certificate(chain=pem(certificate))


def table(*roots: Authority, trust_domain: str = "cluster.local") -> Table:
    return Table(
        services={},
        trust_domain=trust_domain,
        trust_bundle=tuple(pem(r.certificate) for r in roots),
    )


async def _nowhere(csr: Csr) -> None:
    raise AssertionError("tests take the CSR from tick() and made()")


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def make(manager: IdentityManager, due: CsrDue) -> tuple[ec.EllipticCurvePrivateKey, Csr]:
    """What ``run`` does with what ``tick`` asks for: a key and CSR made (here, in this
    process), handed to ``made``."""
    key, csr = make_csr(due.identity)
    made = manager.made(due, key_pem(key), csr)
    assert made is not None, f"{due} no longer wanted by {manager!r}"
    return key, made


@dataclass
class World:
    clock: FakeClock
    ca: Authority
    tls: MeshTls
    manager: IdentityManager
    keys: list[ec.EllipticCurvePrivateKey]
    """the key of every CSR made, the last one last"""

    def sign(
        self,
        csr: Csr,
        service: str = "svc",
        by: Authority | None = None,
        ttl: float = 24 * 3600.0,
    ) -> Certificate:
        certificate = (by or self.ca).sign(
            csr.csr.encode(), service=service, namespace="", now=self.clock.now, ttl=ttl
        )
        return Certificate(chain=pem(certificate))

    def request(self) -> Csr:
        due = self.manager.tick()
        assert due is not None, f"no CSR from {self.manager!r}"
        key, csr = make(self.manager, due)
        self.keys.append(key)
        return csr

    def wait_for_csr(self) -> tuple[Csr, float]:
        """The next CSR, the fake clock moved as ``run`` would sleep; and the time waited."""
        start = self.clock.now
        for _ in range(100):
            due = self.manager.tick()
            if due is not None:
                key, csr = make(self.manager, due)
                self.keys.append(key)
                return csr, self.clock.now - start
            self.clock.advance(self.manager.seconds_to_next())
        raise AssertionError(f"no CSR within 100 naps: {self.manager!r}")

    def certify(self) -> None:
        """A CSR out, its certificate in."""
        self.manager.on_certificate(self.sign(self.request()))
        assert self.manager.credential is not None


def world(rng: float = 0.0, namespace: str = "", make_key: Keygen = keygen.make) -> World:
    clock = FakeClock(wall())
    ca = Authority.create(clock.now)
    tls = MeshTls()
    manager = IdentityManager(
        service="svc",
        namespace=namespace,
        tls=tls,
        now=clock.monotonic,
        rng=lambda: rng,
        make_key=make_key,
    )
    return World(clock, ca, tls, manager, [])


@pytest.fixture
def w() -> World:
    """Welcomed, with the mesh's table: ready to ask."""
    w = world()
    w.manager.attach(_nowhere)
    w.manager.on_table(table(w.ca))
    return w


def asked_for(csr: Csr) -> list[str]:
    request = x509.load_pem_x509_csr(csr.csr.encode())
    names = request.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return names.value.get_values_for_type(x509.UniformResourceIdentifier)


def test_no_csr_before_the_welcome_and_a_trust_bundle() -> None:
    w = world()
    w.manager.on_table(table(w.ca))
    assert w.manager.tick() is None  # no stream
    w = world()
    w.manager.attach(_nowhere)
    assert w.manager.tick() is None  # no trust domain nor bundle yet
    w.manager.on_table(Table(services={}))
    assert w.manager.tick() is None  # a table of a control plane without mesh TLS
    w.manager.on_table(table(w.ca))
    assert asked_for(w.request()) == [ME]


def test_the_first_certificate_is_installed(w: World) -> None:
    csr = w.request()
    assert w.manager.tick() is None  # one CSR in flight at a time
    assert w.tls.server is None
    assert w.tls.client is None
    w.manager.on_certificate(w.sign(csr))
    assert w.tls.server is not None
    assert w.tls.client is not None
    assert w.tls.identity == ME
    assert w.tls.trust_domain == "cluster.local"
    stats = w.manager.statistics()
    assert stats.spiffe_id == ME
    assert stats.seconds_to_expiry == pytest.approx(24 * 3600, abs=1)
    assert stats.rotations == 0
    assert not stats.csr_in_flight
    assert stats.last_error == ""
    assert re.fullmatch(r"[0-9a-f]+", stats.serial)
    assert stats.trust_bundle == [fingerprint(w.ca.certificate)]
    assert w.manager.tick() is None
    assert "no certificate" not in repr(w.manager)
    assert ME in repr(w.manager)


def test_the_namespace_and_trust_domain_make_the_identity() -> None:
    w = world(namespace="shop")
    w.manager.attach(_nowhere)
    w.manager.on_table(table(w.ca, trust_domain="example.org"))
    assert asked_for(w.request()) == ["spiffe://example.org/ns/shop/svc/svc"]


def test_a_new_key_and_csr_at_two_thirds_of_the_life(w: World) -> None:
    w.certify()
    first = w.manager.credential
    assert first is not None
    server, client = w.tls.server, w.tls.client
    due = w.clock.now + ROTATE_AT * (first.not_after - w.clock.now)  # of the life it has left
    w.clock.advance(due - w.clock.now - 1)
    assert w.manager.tick() is None
    assert w.manager.seconds_to_next() == pytest.approx(1)
    w.clock.advance(1)
    csr = w.request()
    assert w.tls.server is server  # the old certificate serves until the new one is in
    w.manager.on_certificate(w.sign(csr))
    second = w.manager.credential
    assert second is not None
    assert second.serial != first.serial
    assert second.key_pem != first.key_pem  # a new key, not a re-signing
    assert w.tls.server is not server
    assert w.tls.client is not client
    assert w.manager.rotations == 1
    assert w.manager.tick() is None


def test_a_short_lived_certificate_is_renewed_at_two_thirds_of_its_own_life(w: World) -> None:
    """Its not_before is set back 60 s for clock skew: counted from there, two thirds of an
    8 s certificate would be due at once, and the sidecar would ask again and again."""
    w.manager.on_certificate(w.sign(w.request(), ttl=8.0))
    assert w.manager.tick() is None
    assert w.manager.seconds_to_next() == pytest.approx(ROTATE_AT * 8.0, abs=1.0)  # (whole s)
    w.clock.advance(ROTATE_AT * 8.0)
    assert w.manager.tick() is not None


def test_the_rotation_jitter_is_a_small_share_of_the_life() -> None:
    w = world(rng=0.999)
    w.manager.attach(_nowhere)
    w.manager.on_table(table(w.ca))
    w.certify()
    c = w.manager.credential
    assert c is not None
    life = c.not_after - w.clock.now
    latest = w.clock.now + (ROTATE_AT + JITTER) * life
    w.clock.advance(ROTATE_AT * life)
    assert w.manager.tick() is None  # later than the plain two thirds
    w.clock.advance(latest - w.clock.now)
    assert w.manager.tick() is not None


def test_a_refused_csr_is_retried_with_a_bounded_backoff_and_the_old_certificate_stays(
    w: World,
) -> None:
    w.certify()
    c = w.manager.credential
    assert c is not None
    server = w.tls.server
    w.clock.advance(ROTATE_AT * (c.not_after - w.clock.now))
    csr = w.request()
    delays = []
    for _ in range(12):
        w.manager.on_certificate(Certificate(error="the token may not do this"))
        assert w.manager.tick() is None
        csr, waited = w.wait_for_csr()
        delays.append(waited)
    assert delays[:3] == [RETRY_BASE / 2, RETRY_BASE, RETRY_BASE * 2]  # rng 0: half a step
    assert max(delays) == RETRY_CAP / 2
    assert w.manager.errors["refused"] == 12
    assert "the token may not do this" in w.manager.last_error
    assert w.tls.server is server
    assert w.manager.credential is c
    w.manager.on_certificate(w.sign(csr))  # the control plane signs again:
    assert w.tls.server is not server
    assert w.manager.last_error == ""
    w.clock.advance(1)
    assert w.manager.tick() is None  # the next one at two thirds of the new life


def test_an_unanswered_csr_is_asked_again(w: World) -> None:
    w.request()
    w.clock.advance(ANSWER_TIMEOUT - 0.5)
    assert w.manager.tick() is None
    w.clock.advance(0.5)
    assert w.manager.tick() is None  # given up on; a backoff first
    assert w.manager.errors["unanswered"] == 1
    assert not w.manager.statistics().csr_in_flight
    csr, waited = w.wait_for_csr()
    assert waited == RETRY_BASE / 2
    w.manager.on_certificate(w.sign(csr))
    assert w.tls.identity == ME


def test_an_expired_certificate_is_dropped_and_asked_for_at_the_next_welcome(w: World) -> None:
    w.certify()
    c = w.manager.credential
    assert c is not None
    w.manager.detach()  # the control plane is gone for a day
    w.clock.advance(c.not_after - w.clock.now - 1)
    assert w.manager.tick() is None
    assert w.tls.server is not None
    w.clock.advance(1)
    assert w.manager.tick() is None
    assert w.tls.server is None
    assert w.tls.client is None
    assert w.tls.identity == ""
    assert w.manager.errors["expired"] == 1
    assert w.manager.seconds_to_expiry() == 0
    assert "expired" in w.manager.last_error
    w.manager.attach(_nowhere)
    w.certify()
    assert w.tls.server is not None


def test_a_reconnect_without_a_certificate_asks_at_once(w: World) -> None:
    w.manager.on_certificate(Certificate(error="not now"))
    assert w.manager.errors["unexpected"] == 1  # no CSR was in flight: ignored
    w.request()
    w.manager.on_certificate(Certificate(error="not now"))
    assert w.manager.tick() is None  # a backoff
    w.manager.detach()
    w.manager.attach(_nowhere)
    w.certify()


def test_a_csr_in_flight_when_the_stream_drops_is_asked_again_on_the_next(w: World) -> None:
    w.request()
    w.manager.detach()
    assert w.manager.tick() is None
    w.manager.attach(_nowhere)
    csr = w.request()
    w.manager.on_certificate(w.sign(csr))
    assert w.tls.identity == ME


def test_a_new_trust_bundle_rebuilds_the_contexts_with_the_same_certificate(w: World) -> None:
    w.certify()
    c = w.manager.credential
    server, client = w.tls.server, w.tls.client
    new_root = Authority.create(w.clock.now)
    w.manager.on_table(table(w.ca, new_root))
    assert w.manager.credential is c
    assert w.tls.server is not server
    assert w.tls.client is not client
    assert w.tls.server is not None
    assert w.tls.identity == ME
    assert len(w.manager.statistics().trust_bundle) == 2
    assert w.manager.tick() is None  # still chains to the bundle: nothing to ask
    same = w.tls.server
    w.manager.on_table(table(w.ca, new_root))
    assert w.tls.server is same  # the same bundle again: nothing rebuilt


def test_a_bundle_without_the_root_of_the_certificate_asks_for_a_new_one(w: World) -> None:
    w.certify()
    new_root = Authority.create(w.clock.now)
    w.manager.on_table(table(new_root))
    csr = w.request()
    assert w.tls.server is not None  # in force (it still serves peers of the old root)
    w.manager.on_certificate(w.sign(csr, by=new_root))
    assert w.manager.rotations == 1
    assert w.tls.identity == ME


def test_a_certificate_for_another_identity_is_never_installed(w: World) -> None:
    csr = w.request()
    w.manager.on_certificate(forged(w.ca, csr, "other", w.clock.now))  # for its key
    assert w.tls.server is None
    assert w.tls.identity == ""
    assert w.manager.credential is None
    assert w.manager.errors["wrong_identity"] == 1
    assert "svc/other" in w.manager.last_error
    assert w.manager.tick() is None  # a backoff, then another CSR
    csr, _ = w.wait_for_csr()
    w.manager.on_certificate(w.sign(csr))
    assert w.tls.identity == ME


def test_a_certificate_of_a_foreign_ca_is_refused(w: World) -> None:
    foreign = Authority.create(w.clock.now)
    w.manager.on_certificate(w.sign(w.request(), by=foreign))
    assert w.manager.credential is None
    assert w.tls.server is None
    assert w.manager.errors["untrusted"] == 1


def test_a_certificate_for_another_key_is_ignored_and_the_csr_stays_in_flight(w: World) -> None:
    csr = w.request()
    _, earlier = make_csr(ME)  # as if the answer to an earlier CSR came late
    w.manager.on_certificate(w.sign(Csr(earlier.decode())))
    _, other = make_csr(spiffe_id("cluster.local", "", "other"))  # whatever it names
    w.manager.on_certificate(w.sign(Csr(other.decode()), service="other"))
    assert w.manager.errors["wrong_key"] == 2
    assert w.manager.errors["wrong_identity"] == 0
    assert w.manager.credential is None
    assert w.manager.statistics().csr_in_flight
    w.manager.on_certificate(w.sign(csr))
    assert w.tls.identity == ME


def test_a_key_and_csr_made_after_the_stream_dropped_are_not_sent(w: World) -> None:
    due = w.manager.tick()
    assert due is not None
    w.manager.detach()  # while the child made them
    key, csr = make_csr(due.identity)
    assert w.manager.made(due, key_pem(key), csr) is None
    w.manager.attach(_nowhere)
    w.certify()  # a new CSR, at once


def test_a_failed_key_maker_is_tried_again_after_a_backoff(w: World) -> None:
    due = w.manager.tick()
    assert due is not None
    w.manager.not_made(due, CertificateRejected("keygen", "the key maker exited with 1"))
    assert w.manager.errors["keygen"] == 1
    assert "exited with 1" in w.manager.last_error
    assert not w.manager.statistics().csr_in_flight
    assert w.manager.tick() is None
    csr, waited = w.wait_for_csr()
    assert waited == RETRY_BASE / 2
    w.manager.on_certificate(w.sign(csr))
    assert w.tls.identity == ME


@pytest.mark.parametrize(
    ("chain", "reason"),
    [
        ("not PEM", "invalid"),
        ("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "invalid"),
        ("", "refused"),  # neither a chain nor an error
    ],
)
def test_garbage_is_refused_naming_why(w: World, chain: str, reason: str) -> None:
    w.request()
    w.manager.on_certificate(Certificate(chain=chain))
    assert w.manager.errors[reason] == 1
    assert w.manager.credential is None


def test_a_certificate_not_valid_yet_is_refused(w: World) -> None:
    csr = w.request()
    certificate = w.ca.sign(csr.csr.encode(), service="svc", namespace="", now=w.clock.now + 600)
    w.manager.on_certificate(Certificate(chain=pem(certificate)))
    assert w.manager.errors["invalid"] == 1
    assert "clock" in w.manager.last_error


async def test_run_sends_csrs_and_stops_when_cancelled() -> None:
    """The loop itself, on the event loop: a table wakes it, a child process makes the key
    and the CSR (``keygen``), the CSR goes out through the stream's send, the answer
    installs; cancelling it ends it at once."""
    w = world()
    sent: list[Csr] = []
    answered = asyncio.Event()

    def answer(csr: Csr) -> None:
        w.manager.on_certificate(w.sign(csr))
        answered.set()

    async def send(csr: Csr) -> None:
        sent.append(csr)
        asyncio.get_running_loop().call_soon(answer, csr)

    task = asyncio.create_task(w.manager.run())
    w.manager.attach(send)
    await asyncio.sleep(0.01)
    assert sent == []  # no trust bundle yet: the loop sleeps
    w.manager.on_table(table(w.ca))
    async with asyncio.timeout(5):
        await answered.wait()
    assert len(sent) == 1
    assert w.tls.identity == ME
    task.cancel()
    async with asyncio.timeout(1):
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_run_makes_the_next_key_ahead_and_rotates_with_it() -> None:
    """Once a certificate is in, the loop has the next rotation's key and CSR made at once;
    at two thirds of the life that CSR goes out without another child process."""
    made: list[bytes] = []
    sent: list[Csr] = []

    async def make_key(identity: str) -> tuple[bytes, bytes]:
        key, csr = make_csr(identity)
        made.append(csr)
        return key_pem(key), csr

    async def send(csr: Csr) -> None:
        sent.append(csr)
        asyncio.get_running_loop().call_soon(ahead.manager.on_certificate, ahead.sign(csr))

    ahead = world(make_key=make_key)
    task = asyncio.create_task(ahead.manager.run())
    ahead.manager.attach(send)
    ahead.manager.on_table(table(ahead.ca))
    for _ in range(500):
        if len(made) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(made) == 2  # the first key, and the spare
    assert [s.csr.encode() for s in sent] == made[:1]
    first = ahead.manager.credential
    assert first is not None
    ahead.clock.advance(ROTATE_AT * (first.not_after - ahead.clock.now))
    ahead.manager.on_table(table(ahead.ca))  # (anything that wakes the loop)
    for _ in range(500):
        if ahead.manager.rotations == 1:
            break
        await asyncio.sleep(0.01)
    assert ahead.manager.rotations == 1
    assert sent[1].csr.encode() == made[1]  # the spare's CSR, made before it was due
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_run_counts_a_key_maker_that_fails_and_sends_nothing() -> None:
    made: list[str] = []
    sent: list[Csr] = []

    async def broken(identity: str) -> tuple[bytes, bytes]:
        made.append(identity)
        raise OSError("python is gone")

    async def send(csr: Csr) -> None:
        sent.append(csr)

    w = world(make_key=broken)
    task = asyncio.create_task(w.manager.run())
    w.manager.attach(send)
    w.manager.on_table(table(w.ca))
    for _ in range(500):
        if w.manager.errors["keygen"]:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert made == [ME]
    assert sent == []
    assert w.manager.errors["keygen"] == 1
    assert "python is gone" in w.manager.last_error
    assert not w.manager.statistics().csr_in_flight


def test_a_new_trust_domain_asks_for_the_new_identity_at_once(w: World) -> None:
    w.certify()
    server = w.tls.server
    w.manager.on_table(table(w.ca, trust_domain="example.org"))
    csr = w.request()
    assert asked_for(csr) == ["spiffe://example.org/ns/default/svc/svc"]
    assert w.tls.server is server  # the old identity serves until the new one is in
    domain = Authority(w.ca.certificate, w.ca.key, trust_domain="example.org")
    w.manager.on_certificate(w.sign(csr, by=domain))
    assert w.tls.identity == "spiffe://example.org/ns/default/svc/svc"


def test_a_csr_in_flight_when_the_trust_domain_changes_is_forgotten(w: World) -> None:
    old = w.request()
    w.manager.on_table(table(w.ca, trust_domain="example.org"))
    w.manager.on_certificate(w.sign(old))  # for the old identity: no longer asked for
    assert w.manager.credential is None
    assert w.manager.errors["unexpected"] == 1
