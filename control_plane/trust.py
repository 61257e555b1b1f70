"""The mesh's trust: the CA that signs workload certificates, kept in the store, and the trust
bundle (the roots sidecars trust), pushed with the routing table (issue 15).

The CA: one handed to the control plane (``--ca-cert``/``--ca-key``) becomes the one in the
store; without one, the store's; with none there, a new root, stored once however many replicas
start together (``Store.init_ca``). Its key is never logged nor in any answer of the API.

The bundle: the roots sidecars verify each other against. A root the control plane made joins
it when it is made; an admin adds the root of a bring-your-own CA, or a new root ahead of a
rotation, and deletes the old one once nothing it signed is in use. The root the signing CA
chains to may not be deleted. A change rebuilds the table (it is in the table).
"""

from __future__ import annotations

import collections
import datetime
import logging
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from control_plane.ca import WORKLOAD_TTL, Authority, CAError, RefusalReason, Refused
from control_plane.clock import Clock
from control_plane.config import ControlPlaneConfig
from control_plane.errors import BadRequest, ConfigError, Conflict, NotFound
from control_plane.store import Snapshot, Store
from control_plane.wire import WireError
from control_plane.wire.identity import MAX_ROOTS, fingerprint, parse_root

log = logging.getLogger("meshlet.trust")

REFUSAL_REASONS: tuple[str, ...] = (*typing.get_args(RefusalReason), "rate")
"""why a CSR is refused (a metric label): over the size limit, not a valid P-256 CSR, an
identity that is not the stream's, more than the stream may ask for per minute"""


@dataclass(frozen=True, slots=True)
class Root:
    """One root of the trust bundle."""

    fingerprint: str
    certificate: x509.Certificate
    pem: str


@dataclass(frozen=True, slots=True)
class TrustStatistics:
    roots: int
    issued: dict[str, int]
    """workload certificates signed, by service"""
    refused: dict[str, int]
    """CSRs refused, by reason (``REFUSAL_REASONS``)"""
    ca_not_after: float
    """when the signing CA expires (wall-clock seconds; 0 before it is loaded)"""


def load_given(config: ControlPlaneConfig, now: float) -> Authority | None:
    """The CA of ``--ca-cert``/``--ca-key``, if given; ConfigError naming the flag."""
    if not config.ca_cert:
        return None
    cert, key = _read(config.ca_cert, "ca_cert"), _read(config.ca_key, "ca_key")
    try:
        return Authority.load(cert, key, now, config.trust_domain)
    except CAError as e:
        raise ConfigError(e.field, str(e)) from None


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(field, f"cannot read {path}: {e.strerror or e}") from None


def _root(pem: str) -> Root:
    certificate = parse_root(pem)
    return Root(fingerprint(certificate), certificate, pem)


def _pem(certificate: x509.Certificate) -> str:
    return certificate.public_bytes(serialization.Encoding.PEM).decode()


class Trust:
    """The signing CA and the trust bundle of one control plane."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        trust_domain: str,
        given: Authority | None = None,
        ttl: float = WORKLOAD_TTL,
    ) -> None:
        self._store = store
        self.ttl = ttl
        self._clock = clock
        self.trust_domain = trust_domain
        self._given = given
        self._authority: Authority | None = None
        self._roots: dict[str, Root] = {}
        self._listener: Callable[[], None] = lambda: None
        self.issued: collections.Counter[str] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()

    def __repr__(self) -> str:
        subject = self.authority.certificate.subject.rfc4514_string() if self._authority else "-"
        return f"<Trust [{subject}, {len(self._roots)} roots, {self.issued.total()} issued]>"

    def on_change(self, listener: Callable[[], None]) -> None:
        """``listener()`` runs after the bundle changed (the table carries it)."""
        self._listener = listener

    @property
    def authority(self) -> Authority:
        assert self._authority is not None, "Trust.start first"
        return self._authority

    async def start(self, snapshot: Snapshot) -> None:
        """The CA: the one given, else the store's, else a new one stored (the store keeps
        the first of replicas starting together); and the bundle as the store holds it."""
        self._roots = {fp: _root(pem) for fp, pem in snapshot.trust_bundle.items()}
        now = self._clock.time()
        if self._given is not None:
            authority = self._given
            if snapshot.ca != _decoded(authority):
                await self._store.replace_ca(*_decoded(authority), self._own_root(authority))
                log.info("signing CA %s, as given", _name(authority))
        elif snapshot.ca is None:
            made = Authority.create(now, self.trust_domain)
            stored = await self._store.init_ca(*_decoded(made), self._own_root(made))
            authority = made if stored == _decoded(made) else self._load(stored, now)
            log.info(
                "signing CA %s, %s", _name(authority), "new" if authority is made else "stored"
            )
        else:
            authority = self._load(snapshot.ca, now)
        self._install(authority)

    def _load(self, stored: tuple[str, str], now: float) -> Authority:
        try:
            return Authority.load(stored[0].encode(), stored[1].encode(), now, self.trust_domain)
        except CAError as e:
            raise ConfigError(
                "ca_cert", f"the CA in the store cannot sign ({e}): give one with --ca-cert"
            ) from None

    @staticmethod
    def _own_root(authority: Authority) -> tuple[str, str] | None:
        """A self-signed CA is its own root, which joins the bundle; an intermediate's root is
        the admin's to add."""
        if not authority.self_signed:
            return None
        return fingerprint(authority.certificate), _pem(authority.certificate)

    def _install(self, authority: Authority) -> None:
        self._authority = authority
        own = self._own_root(authority)
        if own is not None and own[0] not in self._roots:
            self._roots[own[0]] = _root(own[1])
        if not any(self._signs(root) for root in self._roots.values()):
            log.warning(
                "no root of the trust bundle issued the signing CA %s: add its root with "
                "POST /v1/trust-bundle, or sidecars will refuse each other's certificates",
                _name(authority),
            )

    def _signs(self, root: Root) -> bool:
        """Whether ``root`` is the signing CA or the root it chains to."""
        top = self.authority.parents[-1] if self.authority.parents else self.authority.certificate
        if root.certificate == top:
            return True
        try:
            top.verify_directly_issued_by(root.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        return True

    # -- the bundle ---------------------------------------------------------------------------

    def bundle(self) -> tuple[str, ...]:
        """The roots' PEMs, in fingerprint order (so every replica renders one table)."""
        return tuple(self._roots[fp].pem for fp in sorted(self._roots))

    def roots(self) -> list[tuple[Root, bool]]:
        """Each root, and whether the signing CA chains to it."""
        return [(self._roots[fp], self._signs(self._roots[fp])) for fp in sorted(self._roots)]

    async def add_root(self, pem: str) -> Root:
        """BadRequest for what is not one PEM CA certificate, Conflict when it is there or the
        bundle is full."""
        try:
            root = _root(pem)
        except WireError as e:
            raise BadRequest(e.message, e.field) from None
        if root.fingerprint in self._roots:
            raise Conflict(f"root {root.fingerprint} is in the trust bundle already", "pem")
        if len(self._roots) >= MAX_ROOTS:
            raise Conflict(f"the trust bundle holds {MAX_ROOTS} roots, its limit; delete one", None)
        await self._store.put_root(root.fingerprint, root.pem)
        self._roots[root.fingerprint] = root
        log.info("trust bundle: root %s added (%s)", root.fingerprint, _subject(root))
        self._listener()
        return root

    async def delete_root(self, fp: str) -> Root:
        root = self._roots.get(fp)
        if root is None:
            raise NotFound(f"no root {fp[:80]!r} in the trust bundle", "sha256")
        if self._signs(root):
            raise Conflict(
                f"root {fp} is the one the signing CA chains to: switch the CA first", "sha256"
            )
        await self._store.delete_root(fp)
        del self._roots[fp]
        log.info("trust bundle: root %s deleted (%s)", fp, _subject(root))
        self._listener()
        return root

    def apply_roots(self, changed: Mapping[str, str | None]) -> None:
        """Roots as the shared store has them now (another replica added or deleted them)."""
        for fp, pem in changed.items():
            if pem is None:
                self._roots.pop(fp, None)
            else:
                self._roots[fp] = _root(pem)
        if changed:
            self._listener()

    def apply_ca(self, stored: tuple[str, str] | None) -> None:
        """The CA another replica made the store's (it was restarted with ``--ca-cert``)."""
        if stored is None or stored == _decoded(self.authority):
            return
        self._install(self._load(stored, self._clock.time()))
        log.info("signing CA %s, as another replica stored it", _name(self.authority))
        self._listener()

    def reload(self, snapshot: Snapshot) -> None:
        """Everything as the shared store has it (a replica that fell too far behind)."""
        gone: dict[str, str | None] = dict.fromkeys(self._roots)
        self.apply_roots({**gone, **snapshot.trust_bundle})
        self.apply_ca(snapshot.ca)

    # -- signing ------------------------------------------------------------------------------

    def sign(self, csr: str, *, service: str, namespace: str) -> str:
        """A workload certificate for ``service`` and the intermediates above it, PEM;
        Refused (counted by reason) for a CSR this CA will not sign."""
        try:
            certificate = self.authority.sign(
                csr.encode(),
                service=service,
                namespace=namespace,
                now=self._clock.time(),
                ttl=self.ttl,
            )
        except Refused as e:
            self.refuse(e.reason)
            raise
        self.issued[service] += 1
        return _pem(certificate) + self.authority.chain().decode()

    def refuse(self, reason: str) -> None:
        """Count a refusal (a reason from ``REFUSAL_REASONS``)."""
        self.refused[reason] += 1

    def statistics(self) -> TrustStatistics:
        return TrustStatistics(
            len(self._roots),
            dict(self.issued),
            dict(self.refused),
            self._authority.certificate.not_valid_after_utc.timestamp() if self._authority else 0,
        )


def _decoded(authority: Authority) -> tuple[str, str]:
    cert, key = authority.pem()
    return cert.decode(), key.decode()


def _name(authority: Authority) -> str:
    c = authority.certificate
    return f"{c.subject.rfc4514_string()!r} (valid to {c.not_valid_after_utc:%Y-%m-%d})"


def _subject(root: Root) -> str:
    return repr(root.certificate.subject.rfc4514_string()[:200])


def not_after(root: Root) -> str:
    when: datetime.datetime = root.certificate.not_valid_after_utc
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")
