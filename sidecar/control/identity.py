"""The sidecar's workload identity: its key, its CSR, its certificate and their rotation.

The sidecar makes its own ECDSA P-256 key, sends a CSR for its SPIFFE ID over the push stream
(``Csr``) and installs the certificate that comes back (``Certificate``) into ``MeshTls``,
which the data path reads at each handshake. The key and the CSR are made by a short-lived
child process (``keygen``: the sidecar itself never loads ``cryptography``) and come back
over a pipe; from there the key stays in this process's memory: OpenSSL gets it through a
memfd (``sidecar.tls.mesh_contexts``), no file ever holds it. The certificate is checked with
``ssl`` alone (``credentials``).

A certificate valid from B to E goes through:

    B + 2/3 (E - B) + jitter      a new key and CSR (made ahead, once the certificate came in:
                                  the rotation waits for no child process); the certificate
                                  stays in force meanwhile
    refused, or no answer in 30 s another CSR after a backoff (2 s doubling to 5 min, 50-100 %)
    E                             dropped (MeshTls.server and client None: no mesh TLS until
                                  the next one), logged, counted; a CSR at once

A CSR goes out only on a welcomed stream whose table carries a trust domain and a bundle; the
first after the welcome, and after every reconnect while no valid certificate is in force. A
table with another trust bundle rebuilds the contexts with the same key and certificate (and
asks for a new certificate if the one in force no longer chains to it).

Decisions are plain methods that read the injected wall clock (``tick``, ``made``,
``on_certificate``, ``on_table``, ``attach``, ``detach``): tests drive them on a fake clock
without sockets. ``run`` is the thin loop that has a key and CSR made when ``tick`` says one is
due, sends the CSR, and sleeps until the next thing is due.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Final

from control_plane.wire import Certificate, Csr, Table
from control_plane.wire.spiffe import spiffe_id
from sidecar.clock import wall
from sidecar.control import keygen
from sidecar.control.credentials import Credential, accept, chains_to, fingerprints
from sidecar.errors import CertificateRejected, PeerError
from sidecar.tls import MeshTls, mesh_contexts

log = logging.getLogger("meshlet.identity")

ROTATE_AT: Final = 2 / 3
"""share of a certificate's life after which a new one is asked for"""
JITTER: Final = 0.02
"""up to this share of the life is added to the rotation time (sidecars started together
spread their CSRs)"""
ANSWER_TIMEOUT: Final = 30.0
"""seconds a CSR waits for its answer (its key and itself made, sent, answered) before it
counts as unanswered"""
KEYGEN_TIMEOUT: Final = 20.0
"""seconds the child process that makes a key and its CSR may take"""
RETRY_BASE: Final = 2.0
"""seconds before the first retry of a refused or unanswered CSR; doubles up to RETRY_CAP"""
RETRY_CAP: Final = 300.0
MAX_NAP: Final = 60.0
"""seconds ``run`` sleeps at most (a wall clock that jumps is noticed within this)"""
#: why a CSR or a certificate failed: the ``reason`` label of meshlet_identity_errors_total
REASONS: Final = (
    "refused",  # the control plane said no (its error is in last_error)
    "unanswered",  # no answer within ANSWER_TIMEOUT
    "invalid",  # not PEM certificates, too many, or not valid yet
    "wrong_identity",  # names another SPIFFE ID than the one asked for: never installed
    "wrong_key",  # not for the key of the CSR in flight
    "untrusted",  # does not chain to the trust bundle
    "unexpected",  # a certificate while no CSR was in flight
    "expired",  # the certificate in force expired before a new one came
    "keygen",  # the child process that makes the key and the CSR failed
)

Send = Callable[[Csr], Awaitable[None]]
Keygen = Callable[[str], Awaitable[tuple[bytes, bytes]]]
"""a new key and a CSR (each PEM) for a SPIFFE ID (``keygen.make``)"""


@dataclass(frozen=True, slots=True)
class IdentityStatistics:
    spiffe_id: str
    """the identity in force ("" when none)"""
    serial: str
    """the certificate's serial number, hex ("" when none)"""
    not_before: float | None
    """wall-clock seconds since 1970"""
    not_after: float | None
    seconds_to_expiry: float
    """0 when no certificate is in force"""
    rotations: int
    """certificates installed after the first"""
    errors: dict[str, int]
    last_error: str
    trust_domain: str
    trust_bundle: list[str]
    """SHA-256 fingerprints of the roots trusted"""
    csr_in_flight: bool


@dataclass(eq=False, slots=True)
class CsrDue:
    """What ``tick`` asks for: a new key and a CSR for ``identity``, to hand to ``made``. It
    is the CSR in flight from ``since`` (wall time) until answered or given up on."""

    identity: str
    since: float
    key_pem: bytes | None = field(default=None, repr=False)
    """the key the CSR was made with, once ``made``"""


class IdentityManager:
    """Owns one ``MeshTls`` and keeps a valid certificate in it (see the module's doc)."""

    def __init__(
        self,
        *,
        service: str,
        namespace: str,
        tls: MeshTls,
        now: Callable[[], float] = wall,
        rng: Callable[[], float] = random.random,
        make_key: Keygen = keygen.make,
    ) -> None:
        """``now``: wall-clock seconds (certificates are valid between wall times);
        ``rng``: a number in [0, 1) for jitter; ``make_key``: what ``run`` has a key and a CSR
        made by."""
        self.service = service
        self.namespace = namespace
        self.tls = tls
        self._now = now
        self._rng = rng
        self._make_key = make_key
        self.credential: Credential | None = None
        self._bundle: tuple[str, ...] = ()
        self._fingerprints: list[str] = []
        self._pending: CsrDue | None = None
        self._spare: tuple[str, bytes, bytes] | None = None
        """(identity, key, CSR) made ahead for the next rotation"""
        self._spare_for: Credential | None = None
        """the certificate in force when the spare was made (one try each)"""
        self._due = 0.0
        """wall time from which a CSR may go out"""
        self._failures = 0
        self._send: Send | None = None
        self._wake = asyncio.Event()
        self.rotations = 0
        self.errors = dict.fromkeys(REASONS, 0)
        self.last_error = ""

    def __repr__(self) -> str:
        c = self.credential
        held = f"{c.identity} until {_when(c.not_after)}" if c else "no certificate"
        flight = ", CSR in flight" if self._pending else ""
        return f"<IdentityManager {held}, {self.rotations} rotations{flight}>"

    @property
    def identity(self) -> str:
        """The SPIFFE ID this sidecar asks for ("" until a table names the trust domain)."""
        domain = self.tls.trust_domain
        return spiffe_id(domain, self.namespace, self.service) if domain else ""

    # -- inputs -------------------------------------------------------------------------------

    def attach(self, send: Send) -> None:
        """A stream was welcomed: CSRs go out through ``send``; at once if no valid
        certificate is in force."""
        self._send = send
        if self.credential is None:
            self._due = min(self._due, self._now())
        self._wake.set()

    def detach(self) -> None:
        """The stream ended: a CSR in flight will get no answer (the next stream asks again)."""
        self._send = None
        self._pending = None

    def on_table(self, table: Table) -> None:
        """A table in force: take its trust domain and bundle."""
        if table.trust_domain != self.tls.trust_domain:
            self.tls.trust_domain = table.trust_domain
            self._pending = None  # its answer would be for the old identity
            if self.credential is not None and self.credential.identity != self.identity:
                log.warning("the trust domain is now %r: asking for a new identity", self.identity)
                self._due = self._now()
        if table.trust_bundle != self._bundle:
            self._take_bundle(table.trust_bundle)
        self._wake.set()

    def on_certificate(self, message: Certificate) -> None:
        """The control plane's answer to the CSR in flight: install it, or say why not."""
        pending, now = self._pending, self._now()
        try:
            if pending is None or pending.key_pem is None:
                raise CertificateRejected("unexpected", "a certificate came with no CSR in flight")
            if message.error or not message.chain:
                said = repr(message.error[:200]) if message.error else "an empty chain"
                raise CertificateRejected("refused", f"the control plane refused the CSR: {said}")
            credential = accept(
                message.chain,
                key_pem=pending.key_pem,
                identity=pending.identity,
                bundle=self._bundle,
                now=now,
            )
            self._install(credential, now)
        except CertificateRejected as e:
            self._rejected(e, now)
        except ssl.SSLError as e:  # OpenSSL refused what the checks let through
            self._rejected(CertificateRejected("invalid", f"OpenSSL refused it: {e}"), now)
        self._wake.set()

    def tick(self) -> CsrDue | None:
        """Whatever is due now: drop an expired certificate, give up on a CSR unanswered for
        too long, and say if a new key and CSR should be made (the CSR counts as in flight
        from now: ``made`` takes them)."""
        now = self._now()
        c = self.credential
        if c is not None and now >= c.not_after:
            self._drop(now)
        p = self._pending
        if p is not None and now - p.since >= ANSWER_TIMEOUT:
            self._failed("unanswered", f"no answer to the CSR within {ANSWER_TIMEOUT:.0f}s", now)
        if not self._may_ask() or now < self._due:
            return None
        self._pending = CsrDue(self.identity, now)
        return self._pending

    def made(self, due: CsrDue, key_pem: bytes, csr_pem: bytes) -> Csr | None:
        """The key and CSR made for ``due``: the CSR to send, or None when it is no longer
        wanted (the stream ended, or the trust domain changed, meanwhile)."""
        if self._pending is not due or due.key_pem is not None:
            return None
        due.key_pem = key_pem
        log.info("asking the control plane to sign %s", due.identity)
        return Csr(csr_pem.decode("ascii"))

    def not_made(self, due: CsrDue, error: CertificateRejected) -> None:
        """No key and CSR could be made for ``due``: another try after a backoff."""
        if self._pending is due:
            self._failed(error.reason, str(error), self._now())

    def seconds_to_next(self) -> float:
        """How long ``tick`` has nothing to do (at most MAX_NAP)."""
        now = self._now()
        times = [now + MAX_NAP]
        if self.credential is not None:
            times.append(self.credential.not_after)
        if self._pending is not None:
            times.append(self._pending.since + ANSWER_TIMEOUT)
        elif self._may_ask():
            times.append(self._due)
        return max(0.0, min(times) - now)

    def _may_ask(self) -> bool:
        return (
            self._send is not None
            and self._pending is None
            and bool(self.tls.trust_domain)
            and bool(self._bundle)
        )

    # -- the I/O ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Make keys and send CSRs when ``tick`` asks, until cancelled; once a certificate
        is in force, make the key and CSR of the next rotation ahead (``_make_spare``)."""
        while True:
            due = self.tick()
            if due is not None:
                await self._ask(due)
            elif self.credential is not None and self._spare_for is not self.credential:
                await self._make_spare(self.credential)
            self._wake.clear()
            try:
                async with asyncio.timeout(self.seconds_to_next()):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _ask(self, due: CsrDue) -> None:
        """Have a key and CSR made for ``due`` (or take the spare) and send the CSR on the
        stream in force."""
        spare, self._spare = self._spare, None
        try:
            if spare is not None and spare[0] == due.identity:
                key_pem, csr_pem = spare[1], spare[2]
            else:
                async with asyncio.timeout(KEYGEN_TIMEOUT):
                    key_pem, csr_pem = await self._make_key(due.identity)
        except CertificateRejected as e:
            self.not_made(due, e)
            return
        except (OSError, TimeoutError) as e:
            why = str(e) or f"no key within {KEYGEN_TIMEOUT:.0f} s"
            self.not_made(due, CertificateRejected("keygen", f"the key maker failed: {why}"))
            return
        csr, send = self.made(due, key_pem, csr_pem), self._send
        if csr is None or send is None:
            return
        try:
            async with asyncio.timeout(ANSWER_TIMEOUT):
                await send(csr)
        except (PeerError, OSError, TimeoutError) as e:  # the next stream asks again
            log.info("the CSR was not sent: %s", e)

    async def _make_spare(self, credential: Credential) -> None:
        """The key and CSR of the next rotation, made while ``credential`` is in force (hours
        ahead): a rotation then waits for no process start, however busy the host is. One try
        per certificate; a failure is logged, and the rotation makes its own."""
        self._spare_for, identity = credential, self.identity
        try:
            async with asyncio.timeout(KEYGEN_TIMEOUT):
                key_pem, csr_pem = await self._make_key(identity)
        except (CertificateRejected, OSError, TimeoutError) as e:
            log.info("no key made ahead for the next rotation: %s", str(e) or "timed out")
            return
        self._spare = (identity, key_pem, csr_pem)

    # -- state changes ------------------------------------------------------------------------

    def _install(self, credential: Credential, now: float) -> None:
        self._put(credential)  # first: an ssl.SSLError leaves everything as it was
        self._pending = None
        self._failures = 0
        if self.credential is not None:
            self.rotations += 1
        self.credential = credential
        self.last_error = ""
        # two thirds of the life it has from now: its not_before is set back for clock skew
        # (60 s), which would put a short-lived certificate's renewal in the past
        life = max(0.0, credential.not_after - now)
        self._due = now + (ROTATE_AT + self._rng() * JITTER) * life
        log.info(
            "identity %s in force: serial %x, valid %.0f s more, renewed in %.0f s",
            credential.identity,
            credential.serial,
            credential.not_after - now,
            self._due - now,
        )

    def _put(self, c: Credential | None) -> None:
        """Replace MeshTls's contexts and identity whole, for ``c`` and the trust bundle
        (connections keep the contexts they were made with); none without either."""
        if c is None or not self._bundle:
            self.tls.put(None, "")
            return
        self.tls.put(mesh_contexts(c.chain_pem, c.key_pem, list(self._bundle)), c.identity)

    def _take_bundle(self, bundle: tuple[str, ...]) -> None:
        self._bundle = bundle
        self._fingerprints = fingerprints(bundle)
        log.info("trust bundle: %d roots (%s)", len(bundle), ", ".join(self._fingerprints))
        if not bundle:
            log.warning("the table carries no trust bundle: no mesh TLS until one comes")
        c = self.credential
        if c is not None and bundle and not chains_to(c.chain_pem, c.key_pem, bundle):
            log.warning("the certificate in force does not chain to the new bundle: renewing")
            self._due = self._now()
        try:
            self._put(c)
        except ssl.SSLError as e:  # (the table's parser checked every root)
            self._drop_contexts(f"the trust bundle does not load: {e}")

    def _rejected(self, e: CertificateRejected, now: float) -> None:
        if e.reason in ("wrong_key", "unexpected"):  # an answer to an earlier CSR, perhaps
            self.errors[e.reason] += 1
            self.last_error = str(e)
            log.warning("certificate ignored: %s", e)
            return
        self._failed(e.reason, str(e), now)

    def _failed(self, reason: str, message: str, now: float) -> None:
        """A CSR came to nothing: count it, and ask again after a backoff."""
        self._pending = None
        self.errors[reason] += 1
        self.last_error = message
        self._failures += 1
        step = min(RETRY_CAP, RETRY_BASE * 2 ** min(self._failures - 1, 16))
        delay = step * (0.5 + 0.5 * self._rng())
        self._due = now + delay
        c = self.credential
        kept = (
            f"the certificate in force stays until {_when(c.not_after)}" if c else "none in force"
        )
        log.warning("no new certificate: %s (%s); asking again in %.0f s", message, kept, delay)

    def _drop(self, now: float) -> None:
        assert self.credential is not None
        self.errors["expired"] += 1
        self._drop_contexts(f"the certificate of {self.credential.identity} expired")
        self.credential = None
        self._due = min(self._due, now)

    def _drop_contexts(self, why: str) -> None:
        self.last_error = why
        self.tls.put(None, "")
        log.warning("%s: no mesh TLS until a new certificate", why)

    # -- what the admin port shows ------------------------------------------------------------

    def seconds_to_expiry(self) -> float:
        c = self.credential
        return max(0.0, c.not_after - self._now()) if c else 0.0

    def statistics(self) -> IdentityStatistics:
        c = self.credential
        return IdentityStatistics(
            spiffe_id=c.identity if c else "",
            serial=f"{c.serial:x}" if c else "",
            not_before=c.not_before if c else None,
            not_after=c.not_after if c else None,
            seconds_to_expiry=round(self.seconds_to_expiry(), 3),
            rotations=self.rotations,
            errors=dict(self.errors),
            last_error=self.last_error,
            trust_domain=self.tls.trust_domain,
            trust_bundle=list(self._fingerprints),
            csr_in_flight=self._pending is not None,
        )


def _when(t: float) -> str:
    """A wall time for people."""
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
