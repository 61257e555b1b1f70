"""Who is calling: bearer tokens, the principals they stand for, and what each may do.

    token                          principal  may
    ``--admin-token``              admin      everything
    ``--join-token``               join       the stream, register, heartbeat and
                                              deregister instances, and take, renew and
                                              release locks, of any service
    a service token (/v1/tokens)   service    the same, for its own service only
    none, while no token is set    open       everything but minting tokens (a local mesh)

With ``--admin-token`` or ``--join-token`` set, every ``/v1`` call needs one of these tokens;
``/healthz``, ``/readyz``, ``/metrics`` and ``/openapi.json`` stay open. Service tokens are
minted and revoked by the admin and stored as SHA-256 digests: a secret is 256 random bits, so
a fast hash is enough (GitHub and Consul store theirs the same way), and it is shown once.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, replace

from control_plane.clock import Clock
from control_plane.errors import Conflict, NotFound
from control_plane.model import TokenRecord
from control_plane.store import Store

#: service tokens the control plane holds at most (only the admin mints them)
MAX_TOKENS = 10_000
SECRET_PREFIX = "mlt_"
"""starts every service token's secret, so secret scanners and people can tell what it is"""


class Access(enum.Enum):
    """Who may call a route (by the tokens in the table above)."""

    OPEN = "open"
    """anyone, always: probes, metrics, the API description"""
    TOKEN = "token"
    """any valid token: the stream (whose hello the publisher checks against the token)"""
    INSTANCE = "instance"
    """the admin, the join token, or a service token of the path's service (instance calls
    and the service's locks)"""
    ADMIN = "admin"
    """the admin token only"""


class Role(enum.Enum):
    ADMIN = "admin"
    JOIN = "join"
    SERVICE = "service"
    OPEN = "open"


@dataclass(frozen=True, slots=True)
class Principal:
    role: Role
    service: str = ""
    """the service a service token acts for"""
    token_id: str = ""
    """a service token's id"""

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN or self.role is Role.OPEN

    def acts_for(self, service: str) -> bool:
        """May register, heartbeat and deregister ``service``'s instances and open its
        stream."""
        return self.role is not Role.SERVICE or self.service == service

    def __str__(self) -> str:
        if self.role is Role.SERVICE:
            return f"token {self.token_id} of service {self.service}"
        if self.role is Role.OPEN:
            return "an unauthenticated caller (no token is configured)"
        return f"the {self.role.value} token"


ADMIN = Principal(Role.ADMIN)
JOIN = Principal(Role.JOIN)
OPEN = Principal(Role.OPEN)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Tokens:
    """The configured tokens and the service tokens in the store; ``authenticate`` is on
    every ``/v1`` call's path: one SHA-256 and a dict lookup for a service token."""

    def __init__(self, store: Store, clock: Clock, *, admin_token: str, join_token: str) -> None:
        self._store = store
        self._clock = clock
        self._admin = admin_token.encode()
        self._join = join_token.encode()
        self.admin_configured = bool(admin_token)
        self.required = bool(admin_token or join_token)
        """whether callers must present a token (else everyone is ``OPEN``)"""
        self._records: dict[str, TokenRecord] = {}
        self._by_digest: dict[bytes, Principal] = {}
        """raw SHA-256 of each service token's secret -> who it is"""
        self._used: dict[str, float] = {}
        """token id -> wall-clock time of a use not saved yet"""
        self.refusals: collections.Counter[int] = collections.Counter()
        """calls refused for their token, by status (401, 403), read at scrape time"""

    def __repr__(self) -> str:
        mode = "required" if self.required else "open"
        return f"<Tokens [{len(self._records)} service tokens, {mode}]>"

    def load(self, records: list[TokenRecord]) -> None:
        for record in records:
            self._add(record)

    def apply(self, records: Mapping[str, TokenRecord | None]) -> list[str]:
        """Tokens as the shared store has them now (another replica minted or revoked them;
        None: gone); the ids of those that were revoked here by it."""
        revoked = []
        for token_id, record in records.items():
            old = self._records.pop(token_id, None)
            if old is not None:
                del self._by_digest[bytes.fromhex(old.digest)]
            if record is not None:
                self._add(record)
            elif old is not None:
                self._used.pop(token_id, None)
                revoked.append(token_id)
        return revoked

    def _add(self, record: TokenRecord) -> None:
        self._records[record.id] = record
        principal = Principal(Role.SERVICE, record.service, record.id)
        self._by_digest[bytes.fromhex(record.digest)] = principal

    def authenticate(self, authorization: str | None) -> Principal | None:
        """The caller of a request with this ``Authorization`` header; None: refused."""
        if not self.required:
            return OPEN
        if not authorization or authorization[:7].lower() != "bearer ":
            return None
        secret = authorization[7:]
        if secret.startswith(SECRET_PREFIX):  # a service token: the hot path of heartbeats
            principal = self._by_digest.get(hashlib.sha256(secret.encode()).digest())
            if principal is not None:
                self._used[principal.token_id] = self._clock.time()
                return principal
        given = secret.encode("utf-8", "surrogateescape")
        # both comparisons run, so timing tells nothing of which token nearly matched
        is_admin = bool(self._admin) and hmac.compare_digest(given, self._admin)
        is_join = bool(self._join) and hmac.compare_digest(given, self._join)
        return ADMIN if is_admin else JOIN if is_join else None

    def records(self) -> list[TokenRecord]:
        """Every service token, oldest first, with its last use."""
        records = sorted(self._records.values(), key=lambda r: (r.created, r.id))
        return [replace(r, last_used=self._used.get(r.id, r.last_used)) for r in records]

    async def mint(self, service: str, description: str) -> tuple[TokenRecord, str]:
        """A new service token and its secret (which nothing keeps)."""
        if not self.admin_configured:
            raise Conflict(
                "service tokens need --admin-token: without one the API is open and a token "
                "would guard nothing",
                None,
            )
        if len(self._records) >= MAX_TOKENS:
            raise Conflict(f"{MAX_TOKENS} tokens exist; revoke some first", None)
        token_id = secrets.token_hex(6)
        while token_id in self._records:
            token_id = secrets.token_hex(6)
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        record = TokenRecord(token_id, service, description, digest(secret), self._clock.time())
        await self._store.put_token(record)
        self._add(record)
        return record, secret

    async def revoke(self, token_id: str) -> TokenRecord:
        record = self._records.get(token_id)
        if record is None:
            raise NotFound(f"no token {token_id!r}", "id")
        await self._store.delete_token(token_id)
        del self._records[token_id]
        del self._by_digest[bytes.fromhex(record.digest)]
        self._used.pop(token_id, None)
        return record

    async def flush(self) -> None:
        """Save the last uses seen since the last flush (a StoreError keeps them for the next)."""
        if not self._used:
            return
        used, self._used = self._used, {}
        try:
            await self._store.touch_tokens(used)
        except BaseException:
            self._used = used | self._used
            raise
        for token_id, when in used.items():
            record = self._records.get(token_id)
            if record is not None:
                self._records[token_id] = replace(record, last_used=when)
