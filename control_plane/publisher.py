"""The push stream: versioned routing tables out to every sidecar, hellos, heartbeats and
ACKs back.

Registry changes wake ``run``, which waits for ``quiet`` seconds without another change (at
most ``max_wait`` after the first), rebuilds the table, and bumps the version only when the
content changed (the digest persists with the version, so a restart keeps the version when
nothing changed). Each connected sidecar has one sender task that always sends the newest
table; a sidecar that already has it gets nothing. Sends are bounded: at most ``MAX_SENDING``
at once, and a sidecar that does not take a table within ``SEND_TIMEOUT`` is disconnected,
so one slow reader never holds up the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
from dataclasses import dataclass, field

from aiohttp import WSMsgType, web

from control_plane import table
from control_plane.errors import NotFound, StoreError
from control_plane.registry import Registry
from control_plane.store import Store
from control_plane.wire import (
    Ack,
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

MAX_SENDING = 64
SEND_TIMEOUT = 10.0
HELLO_TIMEOUT = 10.0
MAX_MESSAGE = 1024 * 1024


@dataclass(slots=True)
class SidecarSession:
    """One connected sidecar."""

    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
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

    def describe(self) -> dict[str, object]:
        return {
            "node": self.node,
            "service": self.service,
            "instance": self.instance,
            "acked_version": self.acked,
            "last_nack": self.last_nack,
            "connected_since": time.strftime(
                "%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.connected_since)
            ),
        }


class Publisher:
    def __init__(
        self,
        registry: Registry,
        store: Store,
        *,
        quiet: float,
        max_wait: float,
        tokens: tuple[str, ...] = (),
    ) -> None:
        self.registry = registry
        self.store = store
        self.quiet = quiet
        self.max_wait = max_wait
        self.tokens = tuple(t for t in tokens if t)
        self.version = 0
        self.digest = ""
        self.payload = table.message("{}", 0)
        self._installed = False
        self.sessions: dict[int, SidecarSession] = {}
        self._ids = itertools.count(1)
        self._changed = asyncio.Event()
        self._sending = asyncio.Semaphore(MAX_SENDING)
        self.pushes = 0
        registry.on_change(self._changed.set)

    def __repr__(self) -> str:
        return f"<Publisher [version {self.version}, {len(self.sessions)} sidecars]>"

    async def start(self, version: int, digest: str) -> None:
        """Take the version the store remembers; a changed table after a restart bumps it."""
        self.version, self.digest = version, digest
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

    async def rebuild(self) -> bool:
        """Build the table; publish it as a new version if its content changed."""
        services = table.build(self.registry)
        rendered, digest = table.render(services)
        if digest == self.digest:
            if not self._installed:  # the first build after a restart: same content, same version
                self._install(rendered, self.version)
            return False
        version = self.version + 1
        await self.store.put_table_version(version, digest)
        self.digest = digest
        self._install(rendered, version)
        log.info("table version %d: %d services", version, len(services))
        for session in self.sessions.values():
            session.wake.set()
        return True

    def _install(self, rendered: str, version: int) -> None:
        self.version = version
        self.payload = table.message(rendered, version)
        self._installed = True

    def sidecars(self) -> list[dict[str, object]]:
        return [s.describe() for s in sorted(self.sessions.values(), key=lambda s: s.node)]

    async def close_sessions(self) -> None:
        """On shutdown: tell every sidecar we are going (they keep their tables and retry)."""
        sessions = list(self.sessions.values())
        await asyncio.gather(
            *(s.ws.close(code=1001, message=b"control plane shutting down") for s in sessions),
            return_exceptions=True,
        )

    # -- the stream -------------------------------------------------------------------------

    def authorized(self, request: web.Request) -> bool:
        if not self.tokens:
            return True
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        return any(hmac.compare_digest(given, f"Bearer {t}".encode()) for t in self.tokens)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/stream``: one sidecar's session, from hello to close."""
        if not self.authorized(request):
            return web.json_response(
                {
                    "error": "join token missing or wrong: send Authorization: Bearer <token>",
                    "field": None,
                },
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="meshlet"'},
            )
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE)
        await ws.prepare(request)
        session = await self._welcome(ws, request.transport)
        if session is None:
            return ws
        key = next(self._ids)
        self.sessions[key] = session
        sender = asyncio.create_task(self._send_tables(session), name=f"send-{session.node}")
        try:
            await self._receive(session)
        finally:
            # Synchronous first: aiohttp cancels this handler once the socket is gone, and an
            # await here would then skip the rest.
            sender.cancel()
            del self.sessions[key]
            if not session.deregistered:
                self.registry.disconnected(session.service, session.instance)
            log.info(
                "sidecar %s (%s/%s) disconnected", session.node, session.service, session.instance
            )
            await asyncio.gather(sender, return_exceptions=True)
        return ws

    async def _welcome(
        self, ws: web.WebSocketResponse, transport: asyncio.Transport | None
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
        try:
            view, _ = await self.registry.register(hello.service, hello.instance)
        except StoreError as e:
            log.warning("sidecar %s not registered, store failed: %s", hello.node, e)
            await ws.close(code=1011, message=b"store unavailable")
            return None
        instance = view.record.id
        self.registry.report(hello.service, instance, app_healthy=hello.health == "healthy")
        session = SidecarSession(
            ws,
            transport,
            hello.node,
            hello.service,
            instance,
            hello,
            time.time(),
            acked=hello.version,
            sent=hello.version,
        )
        await ws.send_str(encode(Welcome(instance, self.version)))
        session.wake.set()
        log.info(
            "sidecar %s connected for %s/%s at version %d",
            hello.node,
            hello.service,
            instance,
            hello.version,
        )
        return session

    async def _receive(self, session: SidecarSession) -> None:
        async for msg in session.ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            try:
                message = decode(msg.data)
            except WireError as e:
                log.warning("sidecar %s sent a bad message: %s", session.node, e)
                continue
            if isinstance(message, Heartbeat):
                healthy = message.health == "healthy"
                try:
                    self.registry.report(session.service, session.instance, app_healthy=healthy)
                except NotFound:  # removed while connected (an operator's DELETE): back again
                    await self.registry.register(session.service, session.hello.instance)
            elif isinstance(message, Ack):
                session.acked = max(session.acked, message.version)
            elif isinstance(message, Nack):
                session.last_nack = f"version {message.version}: {message.error}"
                log.warning("sidecar %s refused table %s", session.node, session.last_nack)
            elif isinstance(message, Deregister):
                session.deregistered = True
                with contextlib.suppress(NotFound):
                    await self.registry.deregister(session.service, session.instance)
            else:
                log.warning(
                    "sidecar %s sent an unexpected %s", session.node, type(message).__name__
                )

    async def _send_tables(self, session: SidecarSession) -> None:
        """Always the newest table, never one the sidecar has; a stuck sidecar is dropped."""
        while True:
            await session.wake.wait()
            session.wake.clear()
            if session.sent >= self.version:
                continue
            version, payload = self.version, self.payload
            try:
                async with self._sending, asyncio.timeout(SEND_TIMEOUT):
                    await session.ws.send_str(payload)
            except TimeoutError:
                log.warning(
                    "sidecar %s took no table for %.0fs: disconnecting", session.node, SEND_TIMEOUT
                )
                if session.transport is not None:
                    session.transport.abort()  # its buffer is full: a close frame would wait too
                return
            except ConnectionError:
                return
            session.sent = version
            self.pushes += 1
