"""The push stream: versioned routing tables out to every sidecar, hellos, heartbeats and
ACKs back.

Registry changes wake ``run``, which waits for ``quiet`` seconds without another change (at
most ``max_wait`` after the first), rebuilds the table, and bumps the version only when the
content changed (the digest persists with the version, so a restart keeps the version when
nothing changed). Each connected sidecar has one sender task that always sends the newest
table; a sidecar that already has it gets nothing. Sends are bounded per sidecar and never
wait on each other: a sidecar whose send buffer holds more than ``SEND_BUFFER_LIMIT``, or
that does not take a table within ``SEND_TIMEOUT``, is disconnected. WebSocket pings every
``KEEPALIVE`` seconds find streams that went silent without closing.

Who may say what: the token that opened the stream (``api.guard`` checked it) must act for the
hello's service; a stream owns the instance it registered while it is connected, and a hello
for an instance that someone else owns (``ownership``) is refused without touching the record.
Refusals close the stream with ``4000 + status`` (4400 a bad hello or address, 4401 a revoked
token, 4403 another service's instance, 4409 someone else's instance or a full registry), are
counted by reason and logged once per instance and node.

A ``csr`` after hello is signed for the stream's identity: its service (the token's) and the
namespace its instance is registered with. The answer is a ``certificate`` message, with the
chain or the reason it was refused; a refusal leaves the stream open. A stream may ask
``CSR_LIMIT`` times per ``CSR_WINDOW`` seconds (a sidecar renews once in 16 h): more are
refused unread.

Counters are plain integers (no lock, no label lookup on the event path); ``statistics()``
hands them to ``metrics`` when Prometheus scrapes.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

from control_plane import ownership, table
from control_plane.access import Principal
from control_plane.ca import Refused as CsrRefused
from control_plane.clock import Clock
from control_plane.convergence import Convergence
from control_plane.errors import ApiError, BadRequest, NotFound, StoreError
from control_plane.flags import LogBudget
from control_plane.ownership import Claimant
from control_plane.registry import Registry
from control_plane.store import Store
from control_plane.trust import Trust
from control_plane.wire import (
    Ack,
    Certificate,
    Csr,
    Deregister,
    Heartbeat,
    Hello,
    Nack,
    Welcome,
    WireError,
    decode,
    encode,
)

log = logging.getLogger("meshlet.publisher")


class Refused(Exception):
    """A hello this control plane will not take: the stream closes with ``4000 + status``."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        """counted by: scope, admin, owned, rest, address, full"""
        self.message = message

    @classmethod
    def by_registry(cls, error: ApiError) -> Refused:
        reason = "address" if isinstance(error, BadRequest) else "full"
        return cls(error.status, reason, error.message)


SEND_TIMEOUT = 10.0
SEND_BUFFER_LIMIT = 16 * 1024 * 1024
KEEPALIVE = 10.0
HELLO_TIMEOUT = 10.0
MAX_MESSAGE = 1024 * 1024
#: refusals remembered so that each (instance, node) is logged once; the oldest are forgotten
LOGGED_REFUSALS = 1024
CSR_LIMIT = 10
"""CSRs one stream may send per ``CSR_WINDOW``"""
CSR_WINDOW = 60.0
"""seconds"""


@dataclass(slots=True)
class SidecarSession:
    """One connected sidecar."""

    key: int
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    principal: Principal
    node: str
    service: str
    instance: str
    hello: Hello
    connected_since: float
    acked: int = 0
    sent: int = 0
    last_nack: str | None = None
    deregistered: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    complaints: LogBudget = field(default_factory=LogBudget)
    """log lines about what it sends (bad frames, NACKs): a few per 10 s"""
    csrs: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=CSR_LIMIT)
    )
    """monotonic times of its last CSRs (at most ``CSR_LIMIT``)"""

    @property
    def claimant(self) -> Claimant:
        return Claimant(self.principal, self.node)

    def describe(self) -> dict[str, object]:
        return {
            "node": self.node,
            "service": self.service,
            "instance": self.instance,
            "token": self.principal.token_id or self.principal.role.value,
            "acked_version": self.acked,
            "last_nack": self.last_nack,
            "connected_since": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected_since)
            ),
        }


@dataclass(frozen=True, slots=True)
class PublisherStatistics:
    version: int
    sidecars: int
    """open streams"""
    pushes: int
    """tables sent to sidecars"""
    heartbeats: int
    """heartbeat messages received over streams"""
    nacks: int
    """tables sidecars refused"""
    bad_messages: int = 0
    """stream messages that did not parse, or that a sidecar may not send"""
    refused: dict[str, int] = field(default_factory=dict)
    """hellos refused, by reason (``Refused.reason``)"""


class Publisher:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        *,
        quiet: float,
        max_wait: float,
        clock: Clock,
        trust: Trust,
    ) -> None:
        self.registry = registry
        self.trust = trust
        self.clock = clock
        self.store = store
        self.quiet = quiet
        self.max_wait = max_wait
        self.version = 0
        self.digest = ""
        self.epoch = ""
        self.built = 0.0
        """wall-clock time the version in force was built (kept across restarts)"""
        self.payload = table.message(table.render({})[0], 0, "", 0.0)
        self.services: dict[str, Any] = {}
        """the table in force, as built (what ``payload`` carries)"""
        self._installed = False
        self.sessions: dict[int, SidecarSession] = {}
        self._owners: dict[tuple[str, str], int] = {}  # instance -> the session it is live on
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self.convergence = Convergence()
        self.claim: (
            Callable[[str, frozenset[tuple[str, str]], float], Awaitable[tuple[int, float]]] | None
        ) = None
        """replicas: the version every replica gives a table's content (and when it was
        first built), from the shared store; None: this process numbers its own"""
        self.sidecars_of_all: Callable[[], Awaitable[list[dict[str, object]]]] | None = None
        """replicas: the sidecars connected to every replica"""
        self.pushes = 0
        self.heartbeats = 0
        self.nacks = 0
        self.bad_messages = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self._logged: collections.OrderedDict[tuple[str, ...], None] = collections.OrderedDict()
        registry.on_change(self._on_change)
        trust.on_change(self._on_change)

    def __repr__(self) -> str:
        return f"<Publisher [version {self.version}, {len(self.sessions)} sidecars]>"

    def statistics(self) -> PublisherStatistics:
        return PublisherStatistics(
            self.version,
            len(self.sessions),
            self.pushes,
            self.heartbeats,
            self.nacks,
            self.bad_messages,
            dict(self.refused),
        )

    def _on_change(self) -> None:
        self.convergence.changed()
        self._changed.set()

    async def start(self, version: int, digest: str, epoch: str, built: float) -> None:
        """Take the version the store remembers; a changed table after a restart bumps it."""
        self.version, self.digest, self.epoch, self.built = version, digest, epoch, built
        await self.rebuild()

    async def run(self) -> None:
        """Rebuild after changes, debounced, until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            await self._changed.wait()
            deadline = loop.time() + self.max_wait
            while True:  # wait until quiet for self.quiet, or the deadline
                self._changed.clear()
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(min(self.quiet, left)):
                        await self._changed.wait()
                except TimeoutError:
                    break
            try:
                await self.rebuild()
            except StoreError as e:
                log.warning("table not published, store failed: %s; retrying", e)
                self._changed.set()
                await asyncio.sleep(1.0)
            except Exception:
                log.exception("bug: table not published; retrying in 1s")
                self._changed.set()
                await asyncio.sleep(1.0)

    async def rebuild(self) -> bool:
        """Build the table; publish it as a new version if its content changed. Replicas ask
        the shared counter every time: another replica may have numbered other content since
        this one last published (content this one never saw, debounced away), and a table
        this one already has may then need the newer version every other replica gives it."""
        since = self.convergence.take()
        views = self.registry.views()  # one snapshot: the table and what it leaves out
        services = table.build(views)
        rendered, digest = table.render(services, self.trust.trust_domain, self.trust.bundle())
        if digest == self.digest and self.claim is None:
            if not self._installed:  # the first build after a restart: same content, same version
                self._install(services, rendered, self.version)
            return False
        version, built = self.version + 1, self.clock.time()
        try:
            if self.claim is not None:
                version, built = await self.claim(digest, table.unhealthy(views), built)
            else:
                await self.store.put_table_version(version, digest, table.unhealthy(views), built)
        except BaseException:
            self.convergence.restore(since)  # the retry publishes the same change
            raise
        if version == self.version and self._installed:
            return False  # (a replica: the same content, already under this version)
        self.digest, self.built = digest, built
        self._install(services, rendered, version)
        log.info("table version %d: %d services", version, len(services))
        behind = [key for key, session in self.sessions.items() if session.acked < version]
        self.convergence.published(version, since, behind)
        for session in self.sessions.values():
            session.wake.set()
        return True

    def _install(self, services: dict[str, Any], rendered: str, version: int) -> None:
        self.services = services
        self.version = version
        self.payload = table.message(rendered, version, self.epoch, self.built)
        self._installed = True

    def _cut(self, session: SidecarSession, why: str) -> None:
        """Disconnect a sidecar that stopped reading (a close frame would wait too)."""
        log.warning("sidecar %s %s: disconnecting", session.node, why)
        if session.transport is not None:
            session.transport.abort()

    def sidecars(self) -> list[dict[str, object]]:
        """The sidecars connected to this process."""
        return [s.describe() for s in sorted(self.sessions.values(), key=lambda s: s.node)]

    async def all_sidecars(self) -> list[dict[str, object]]:
        """The sidecars connected to this control plane: to every replica, when there are."""
        if self.sidecars_of_all is None:
            return self.sidecars()
        return await self.sidecars_of_all()

    async def close_sessions(self) -> None:
        """On shutdown: tell every sidecar we are going (they keep their tables and retry).
        A sidecar that does not take the close within a second is cut off."""

        sessions = list(self.sessions.values())
        await asyncio.gather(
            *(self._close(s, 1001, "control plane shutting down") for s in sessions)
        )

    def owner(self, service: str, instance_id: str) -> SidecarSession | None:
        """The live stream that owns an instance, if any."""
        key = self._owners.get((service, instance_id))
        return None if key is None else self.sessions.get(key)

    async def close_streams_of(self, token_id: str) -> int:
        """Close the streams opened with a (revoked) service token, at once: a close frame,
        and a cut after a second for a sidecar that does not take it."""
        doomed = [s for s in self.sessions.values() if s.principal.token_id == token_id]
        await asyncio.gather(*(self._close(s, 4401, "token revoked") for s in doomed))
        return len(doomed)

    async def _close(self, session: SidecarSession, code: int, why: str) -> None:
        try:
            async with asyncio.timeout(1.0):
                await session.ws.close(code=code, message=why.encode()[:120])
        except (TimeoutError, ConnectionError):
            if session.transport is not None:
                session.transport.abort()

    # -- the stream -------------------------------------------------------------------------

    async def handle(self, request: web.Request, principal: Principal) -> web.StreamResponse:
        """``GET /v1/stream``: one sidecar's session, from hello to close. ``principal`` is
        who opened it (the guard refused a stream without a valid token)."""
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE, heartbeat=KEEPALIVE)
        await ws.prepare(request)
        key = next(self._ids)
        session = await self._welcome(ws, request.transport, principal, key)
        if session is None:
            return ws
        sender = asyncio.create_task(self._send_tables(session), name=f"send-{session.node}")
        try:
            await self._receive(session)
        finally:
            # Synchronous first: aiohttp cancels this handler once the socket is gone, and an
            # await here would then skip the rest.
            sender.cancel()
            self._end(key, session)
            await asyncio.gather(sender, return_exceptions=True)
        return ws

    def _end(self, key: int, session: SidecarSession) -> None:
        self.sessions.pop(key, None)
        self.convergence.gone(key)
        instance = (session.service, session.instance)
        if self._owners.get(instance) == key:  # a newer stream for the instance may be live
            del self._owners[instance]
            if not session.deregistered:
                self.registry.disconnected(session.service, session.instance)
        log.info("sidecar %s (%s/%s) disconnected", session.node, *instance)

    async def _welcome(
        self,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        principal: Principal,
        key: int,
    ) -> SidecarSession | None:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                msg = await ws.receive()
            hello = decode(msg.data) if msg.type is WSMsgType.TEXT else None
            if not isinstance(hello, Hello):
                raise WireError("type", "the first message must be hello")
        except (TimeoutError, WireError) as e:
            await ws.close(code=4400, message=f"bad hello: {e}"[:120].encode())
            return None
        instance = hello.instance.instance_id()
        try:
            self._admit(hello, instance, principal)
        except Refused as e:
            await self._refuse(ws, hello, instance, e)
            return None
        # The session owns its instance before registering: if this handler is cancelled
        # (the socket died) anywhere from here on, _end marks the instance unhealthy.
        session = SidecarSession(
            key,
            ws,
            transport,
            principal,
            hello.node,
            hello.service,
            instance,
            hello,
            time.time(),
            acked=hello.version,
            sent=hello.version,
        )
        if hello.epoch != self.epoch or (hello.version > self.version and self.claim is None):
            # its table is from another history (this control plane's store was reset, or it
            # is another control plane): versions do not compare, so it gets ours whatever.
            # (From a replica that is ahead of this one, it gets only a newer version.)
            session.sent = session.acked = 0
        self.sessions[key] = session
        self._owners[(hello.service, instance)] = key
        try:
            await self._register(session)
            self.registry.set_app_health(
                hello.service, instance, app_healthy=hello.health == "healthy"
            )
            await ws.send_str(encode(Welcome(instance, self.version, self.epoch)))
        except StoreError as e:
            log.warning("sidecar %s not registered, store failed: %s", hello.node, e)
            self._end(key, session)
            await ws.close(code=1011, message=b"store unavailable")
            return None
        except ApiError as e:  # an address no caller may be sent to, a full registry
            self._end(key, session)
            await self._refuse(ws, hello, instance, Refused.by_registry(e))
            return None
        except BaseException:  # gone between hello and welcome: not live after all
            self._end(key, session)
            raise
        session.wake.set()
        log.info(
            "sidecar %s connected for %s/%s at version %d",
            hello.node,
            hello.service,
            instance,
            hello.version,
        )
        return session

    def _admit(self, hello: Hello, instance: str, principal: Principal) -> None:
        """Whether this stream may register the hello's instance; Refused if not."""
        if not principal.acts_for(hello.service):
            raise Refused(403, "scope", f"{principal} acts only for {principal.service}")
        owner = self.owner(hello.service, instance)
        refused = ownership.refusal(
            self.registry.find(hello.service, instance),
            owner.claimant if owner is not None else None,
            Claimant(principal, hello.node),
        )
        if refused is not None:
            raise Refused(409, refused.reason, refused.message)

    async def _refuse(
        self, ws: web.WebSocketResponse, hello: Hello, instance: str, error: Refused
    ) -> None:
        """Close a stream whose hello is refused, with ``4000 + status``; counted, and logged
        once per instance and node."""
        self.refused[error.reason] += 1
        what = (hello.service, instance, hello.node, error.reason)
        if what not in self._logged:
            self._logged[what] = None
            if len(self._logged) > LOGGED_REFUSALS:
                self._logged.popitem(last=False)
            log.warning(
                "sidecar %s refused %s/%s: %s", hello.node, hello.service, instance, error.message
            )
        await ws.close(code=4000 + error.status, message=error.message.encode()[:120])

    async def _register(self, session: SidecarSession) -> None:
        """Register the session's instance (StoreError, or ApiError for a refused one)."""
        origin = session.claimant.origin
        hello = session.hello
        await self.registry.register(session.service, hello.instance, origin, tls=hello.tls)

    async def _receive(self, session: SidecarSession) -> None:
        async for msg in session.ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                message = decode(msg.data)
            except WireError as e:
                self.bad_messages += 1
                self._complain(session, "sent a bad message: %s", e)
                continue
            if session.deregistered:
                continue  # it is going: a late heartbeat must not bring it back
            if isinstance(message, Heartbeat):
                self.heartbeats += 1
                healthy = message.health == "healthy"
                try:
                    self.registry.report(session.service, session.instance, app_healthy=healthy)
                except NotFound:  # removed while connected (an operator's DELETE): back again
                    try:
                        await self._register(session)
                        self.registry.report(session.service, session.instance, app_healthy=healthy)
                    except (StoreError, ApiError) as e:  # the next heartbeat tries again
                        log.warning("sidecar %s not registered again: %s", session.node, e)
            elif isinstance(message, Ack):
                session.acked = max(session.acked, message.version)
                self.convergence.acked(session.key, message.version)
            elif isinstance(message, Nack):
                self.nacks += 1
                self.convergence.refused(session.key, message.version)
                session.last_nack = f"version {message.version}: {message.error}"
                self._complain(session, "refused table %s", session.last_nack)
            elif isinstance(message, Deregister):
                session.deregistered = True
                await self._deregister(session)
            elif isinstance(message, Csr):
                answer = self._certificate(session, message)
                with contextlib.suppress(ConnectionError):
                    await session.ws.send_str(encode(answer))
                if answer.chain and not session.hello.tls:
                    # its inbound takes mesh TLS from now on: callers are told with the table
                    session.hello = dataclasses.replace(session.hello, tls=True)
                    with contextlib.suppress(StoreError, ApiError):  # (its next hello says so)
                        await self._register(session)
            else:
                self.bad_messages += 1
                self._complain(session, "sent an unexpected %s", type(message).__name__)

    def _certificate(self, session: SidecarSession, message: Csr) -> Certificate:
        """Sign the stream's CSR for its own identity, or say why not (logged either way)."""
        now = self.clock.monotonic()
        if len(session.csrs) == CSR_LIMIT and now - session.csrs[0] < CSR_WINDOW:
            self.trust.refuse("rate")
            error = f"more than {CSR_LIMIT} CSRs in {CSR_WINDOW:.0f}s on this stream"
            self._complain(session, "CSR refused for %r: %s", session.service, error)
            return Certificate(error=error)
        session.csrs.append(now)
        # the namespace its instance has (a hello that leaves it out keeps the registered one)
        record = self.registry.find(session.service, session.instance)
        namespace = record.namespace if record is not None else ""
        try:
            chain = self.trust.sign(message.csr, service=session.service, namespace=namespace)
        except CsrRefused as e:
            self._complain(session, "CSR refused for %r: %r", session.service, str(e)[:300])
            return Certificate(error=str(e)[:1024])
        log.info(
            "certificate issued to %r (node %s, namespace %r)",
            session.service,
            session.node,
            namespace or "default",
        )
        return Certificate(chain=chain)

    @staticmethod
    def _complain(session: SidecarSession, what: str, *args: object) -> None:
        """A warning about what a sidecar sent, within its log budget."""
        suffix = session.complaints.take()
        if suffix is not None:
            log.warning(f"sidecar %s {what}%s", session.node, *args, suffix)

    async def _deregister(self, session: SidecarSession) -> None:
        """A stream removes only its own instance: one it registered and still owns."""
        key = (session.service, session.instance)
        owned = self._owners.get(key) == session.key
        if not owned or ownership.refusal(self.registry.find(*key), None, session.claimant):
            log.warning(
                "sidecar %s asked to deregister %s/%s, which its stream does not own: ignored",
                session.node,
                *key,
            )
            return
        with contextlib.suppress(NotFound):
            await self.registry.deregister(*key)

    async def _send_tables(self, session: SidecarSession) -> None:
        """Always the newest table, never one the sidecar has; a stuck sidecar is dropped."""
        while True:
            await session.wake.wait()
            session.wake.clear()
            if session.sent >= self.version:
                continue
            version, payload = self.version, self.payload
            buffered = session.transport.get_write_buffer_size() if session.transport else 0
            if buffered > SEND_BUFFER_LIMIT:
                self._cut(session, f"{buffered} bytes of tables unread")
                return
            try:
                async with asyncio.timeout(SEND_TIMEOUT):
                    await session.ws.send_str(payload)
            except TimeoutError:
                self._cut(session, f"took no table for {SEND_TIMEOUT:.0f}s")
                return
            except ConnectionError:
                return
            session.sent = version
            self.pushes += 1
