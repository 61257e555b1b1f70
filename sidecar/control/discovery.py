"""The sidecar's end of the push stream: register, heartbeat, apply tables, ACK or NACK.

A table is applied only if it parses and is newer than the one in force; otherwise it is
NACKed with the reason and the last good table stays. Every applied table is saved
(``state``) so the next start works without a control plane. A lost connection is retried
with jittered exponential backoff (0.1 s doubling to 30 s, a random 50-100 % of that); the
sidecar keeps serving from the table it has all along.

Several control-plane URLs, or a host name with several addresses, are replicas of one
control plane: ``failover`` says which the stream tries next and when. The table version and
epoch in force go with the sidecar from replica to replica: its hello says them, so a replica
that is at that version sends nothing, and one of the same history sends only what is newer.

The stream carries ``--token`` as ``Authorization: Bearer``; an ``https://`` control plane's
certificate is checked with the given ``tls`` context (``--ca-file``). A control plane that
refuses the stream (HTTP 401/403, or a 44xx close code) says why in the log line and in
``last_error``; the sidecar keeps retrying (a revoked token may be replaced on disk, an
instance's other owner may go away).

With mesh TLS on (``identity``), the hello says the inbound listener accepts it, the identity
sends its CSRs on the stream in force, and the ``certificate`` answers and every table applied
go to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import re
import socket
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Final

from control_plane.wire import (
    STREAM_PATH,
    Ack,
    Certificate,
    Deregister,
    Heartbeat,
    Hello,
    Nack,
    Registration,
    Table,
    Welcome,
    WireError,
    decode,
    encode,
    following,
)
from sidecar import heap
from sidecar.clock import Clock, SystemClock
from sidecar.control import state
from sidecar.control.failover import Failover, Replica, resolve
from sidecar.control.websocket import Close
from sidecar.control.wsclient import WebSocket, connect
from sidecar.errors import HandshakeError, PeerError, TableError
from sidecar.proxy.routing import TableHolder

if TYPE_CHECKING:  # (a sidecar on a static table does without it: see Sidecar.__init__)
    from sidecar.control.identity import IdentityManager

log = logging.getLogger("meshlet.discovery")

HEARTBEAT_EVERY = 5.0
KEEPALIVE = 10.0
"""seconds of silence from the control plane before a ping; no answer within half that and
the stream counts as dead"""
CONNECT_TIMEOUT = 10.0
"""seconds to resolve the control plane's names, or to connect, agree TLS and be upgraded"""
WELCOME_TIMEOUT = 10.0
MAX_TABLE_BYTES = 256 * 1024 * 1024

#: close codes a control plane refuses a stream with, and what they mean for this sidecar
REFUSED: Final = {
    4400: "bad hello",
    4401: "unauthorized: the token is missing, wrong or revoked",
    4403: "forbidden: the token may not speak for this service or instance",
    4409: "the instance is owned by another live stream",
}


def node_id(service: str) -> str:
    raw = f"{service}-{socket.gethostname()}-{os.getpid()}"
    return re.sub(r"[^A-Za-z0-9._-]", "-", raw)[:128]


def describe_close(code: int | None, reason: str) -> str:
    """Why the control plane ended a stream, for the log and ``last_error``."""
    said = f": {reason}" if reason else ""
    if code in REFUSED:
        return f"the control plane refused the stream with {code} ({REFUSED[code]}){said}"
    if code is None:
        return "the control plane closed the stream"
    return f"the control plane closed the stream with {code}{said}"


def describe_failure(e: Exception) -> str:
    """A failed connect or session, said plainly: refusals and untrusted certificates first."""
    if isinstance(e, HandshakeError) and e.status in (401, 403):
        what = "the token is missing or wrong" if e.status == 401 else "the token may not do this"
        return f"the control plane refused the stream with HTTP {e.status} ({what})"
    if isinstance(e, HandshakeError) and e.status != 101:
        return f"the control plane answered HTTP {e.status} instead of opening the stream"
    if isinstance(e, ssl.SSLCertVerificationError):
        return (
            f"the control plane's TLS certificate is not trusted ({e}); "
            "--ca-file names the CA that signs it"
        )
    return str(e) or type(e).__name__


def stream_url(control_plane: str) -> str:
    base = control_plane.rstrip("/")
    if base.startswith("https://"):
        return "wss://" + base.removeprefix("https://") + STREAM_PATH
    return "ws://" + base.removeprefix("http://") + STREAM_PATH


class Discovery:
    def __init__(
        self,
        *,
        control_planes: Sequence[str],
        token: str,
        service: str,
        registration: Registration,
        tables: TableHolder,
        state_path: Path,
        app_healthy: bool = True,
        tls: ssl.SSLContext | None = None,
        failover: Failover | None = None,
        clock: Clock | None = None,
        resolver: Callable[[str], Awaitable[list[Replica]]] = resolve,
        identity: IdentityManager | None = None,
    ) -> None:
        """``resolver``: the addresses a control-plane URL stands for (``failover.resolve``:
        the system's resolver); ``identity``: the workload identity that CSRs go out for and
        certificates come in to (None: ``--mtls off``)."""
        assert control_planes, "a control plane to connect to"
        self.targets = tuple(control_planes)
        """the control plane's URLs, as configured"""
        self.url = stream_url(self.targets[0])
        """the stream URL tried last (or to be tried first)"""
        self.replica: Replica | None = None
        """the address the stream is up with, or None"""
        self.failover = failover or Failover()
        self._clock = clock or SystemClock()
        self._resolver = resolver
        self.token = token
        self.tls = tls
        self.service = service
        self.registration = registration
        self.tables = tables
        self.identity = identity
        self.state_path = state_path
        self.node = node_id(service)
        self.version = tables.current.info.version if tables.current else 0
        self.epoch = tables.current.table.epoch if tables.current else ""
        self._welcomed_at: float | None = None
        """when the stream in force was welcomed (``clock``), or None"""
        self._newer_than = self.version
        """a table must be newer than this to be applied: the version in force, or 0 in a
        session with a control plane of another history"""
        self._sent: tuple[Table | None, Mapping[str, bytes]] = (None, {})
        """the last table the stream sent that went in force, and digests of the JSON each
        of its services came in (``wire.following``: what comes again as it was is not
        parsed again)"""
        self.instance: str | None = None
        self.app_healthy = app_healthy
        self.connected = False
        self.last_error = ""
        self._ws: WebSocket | None = None
        self._health_changed = asyncio.Event()
        self._beats: asyncio.Task[None] | None = None
        self._stopping = False

    def __repr__(self) -> str:
        state = "connected" if self.connected else f"disconnected ({self.last_error})"
        return f"<Discovery {self.replica or self.url} {state}, version {self.version}>"

    def set_app_health(self, healthy: bool) -> None:
        self.app_healthy = healthy
        self._health_changed.set()

    async def run(self) -> None:
        """Stay connected until cancelled (or deregistered), failing over between replicas."""
        while not self._stopping:
            if self.failover.round_over:
                self.failover.begin(await self._resolve())
            replica = self.failover.pick()
            self._welcomed_at = None
            if replica is not None:
                self.url = stream_url(replica.url)
                try:
                    self.last_error = await self._session(replica)
                except (PeerError, OSError, TimeoutError, WireError) as e:
                    self.last_error = describe_failure(e)
                finally:
                    self.connected = False
                    self.replica = None
                    self._ws = None
            if self._stopping:  # (deregister() meanwhile: mypy does not see it)
                return  # type: ignore[unreachable]
            welcomed = self._welcomed_at
            up_for = None if welcomed is None else self._clock.monotonic() - welcomed
            delay = self.failover.ended(up_for)
            self._log_down(replica, delay)
            await asyncio.sleep(delay)

    def _log_down(self, replica: Replica | None, delay: float) -> None:
        where = f" ({replica})" if replica is not None and len(self.targets) > 1 else ""
        then = f"retrying in {delay:.1f}s" if delay else "trying the next address at once"
        log.warning("control plane stream down%s (%s); %s", where, self.last_error, then)

    async def _resolve(self) -> list[Replica]:
        """This round's addresses: every URL's (looked up together, in the given order), those
        that resolve (why the others do not is logged, and is ``last_error`` when none does)."""
        found = await asyncio.gather(*(self._resolve_one(url) for url in self.targets))
        return [replica for replicas in found for replica in replicas]

    async def _resolve_one(self, url: str) -> list[Replica]:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                return await self._resolver(url)
        except (OSError, TimeoutError) as e:
            why = str(e) or "timed out"
            self.last_error = f"cannot resolve {url}: {why}"
            log.warning("control plane %s: its host name does not resolve: %s", url, why)
            return []

    async def _session(self, replica: Replica) -> str:
        """One stream to ``replica``, from hello to close; why it closed."""
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        async with asyncio.timeout(CONNECT_TIMEOUT):
            ws = await connect(
                self.url,
                headers=headers,
                tls=self.tls,
                max_message=MAX_TABLE_BYTES,
                keepalive=KEEPALIVE,  # pings find a control plane that went silent
                address=replica.address,
            )
        async with ws:
            health = "healthy" if self.app_healthy else "unhealthy"
            hello = Hello(
                self.node,
                self.service,
                self.registration,
                self.version,
                health,
                self.epoch,
                # its inbound takes mesh TLS once it holds a certificate (the control plane
                # marks it so when it signs one, for a sidecar that had none at its hello)
                tls=self.identity is not None and self.identity.tls.server is not None,
            )
            await ws.send_text(encode(hello))
            async with asyncio.timeout(WELCOME_TIMEOUT):
                first = await ws.receive()
            if isinstance(first, Close):
                return describe_close(first.code, first.reason)
            if not isinstance(first.data, str):
                raise WireError("(stream)", "a binary message before the welcome")
            welcome = decode(first.data)
            if not isinstance(welcome, Welcome):
                raise WireError("type", "the control plane's first message must be welcome")
            # The version and epoch in force stay what they are (the next replica's hello says
            # them); only what this session may apply changes.
            self._newer_than = self.version
            if welcome.epoch != self.epoch or welcome.version < self.version:
                if self.epoch:
                    log.warning(
                        "the control plane's tables are another history (epoch %s, version %d; "
                        "ours %s, %d; its store was reset?): taking its next table",
                        welcome.epoch,
                        welcome.version,
                        self.epoch,
                        self.version,
                    )
                self._newer_than = 0
            self.instance = welcome.instance
            self.connected = True
            self.replica = replica
            self._welcomed_at = self._clock.monotonic()
            self.failover.welcomed(replica)
            self.last_error = ""
            self._ws = ws
            log.info("connected to %s as %s/%s", replica, self.service, welcome.instance)
            self._beats = asyncio.create_task(self._heartbeats(ws), name="heartbeats")
            if self.identity is not None:
                self.identity.attach(lambda csr: ws.send_text(encode(csr)))
            try:
                return await self._take_messages(ws)
            finally:
                if self.identity is not None:
                    self.identity.detach()
                self._beats.cancel()
                await asyncio.gather(self._beats, return_exceptions=True)

    async def _take_messages(self, ws: WebSocket) -> str:
        """Apply, ACK or NACK every table, hand certificates to the identity, until the
        stream closes; why it closed. (A frame the stream forbids, or no pong within the
        keepalive, raises PeerError.)"""
        while True:
            msg = await ws.receive()
            if isinstance(msg, Close):
                return describe_close(msg.code, msg.reason)
            if isinstance(msg.data, str):
                answer = await self._apply(msg.data)
                del msg  # a table's text (a few MB) is not held while the next one is awaited
                if answer is not None:
                    await ws.send_text(encode(answer))

    async def _heartbeats(self, ws: WebSocket) -> None:
        """Every 5 s +-10 %, and at once when the app's health changes."""
        while True:
            self._health_changed.clear()
            health = "healthy" if self.app_healthy else "unhealthy"
            await ws.send_text(encode(Heartbeat(health)))
            try:
                async with asyncio.timeout(HEARTBEAT_EVERY * random.uniform(0.9, 1.1)):
                    await self._health_changed.wait()
            except TimeoutError:
                pass

    async def _apply(self, text: str) -> Ack | Nack | None:
        """What a message from the control plane is answered with: a table's ACK or NACK; a
        certificate goes to the identity, unanswered."""
        held, sent = self._sent
        current = self.tables.current
        if current is None or current.table is not held:
            sent = {}
        try:
            with following(self.tables.in_force(), sent) as parsed:
                message = decode(text)
        except WireError as e:
            log.warning("table refused: %s", e)
            return Nack(_version_of(text), str(e))
        if isinstance(message, Certificate):
            if self.identity is None:
                log.warning("a certificate came, but this sidecar asked for none (--mtls off)")
            else:
                self.identity.on_certificate(message)
            return None
        if not isinstance(message, Table):
            return Nack(0, f"expected a table, got {type(message).__name__}")
        return await self._apply_table(message, text, parsed.digests)

    async def _apply_table(
        self, message: Table, text: str, digests: Mapping[str, bytes]
    ) -> Ack | Nack:
        if message.version <= self._newer_than:
            error = f"version {message.version} is not newer than {self._newer_than}"
            log.warning("table refused: %s", error)
            return Nack(message.version, error)
        try:
            self.tables.install(message, "control-plane")
        except TableError as e:
            log.warning("table %d refused: %s", message.version, e)
            return Nack(message.version, str(e))
        self.version = self._newer_than = message.version
        self.epoch = message.epoch
        self._sent = (message, digests)
        if self.identity is not None:
            self.identity.on_table(message)
        try:
            await asyncio.get_running_loop().run_in_executor(
                None, state.save, self.state_path, text
            )
        except OSError as e:
            log.warning(
                "table %d in force but not saved to %s: %s", message.version, self.state_path, e
            )
        log.info("table version %d applied: %d services", message.version, len(message.services))
        heap.tidy_after(len(text))
        return Ack(message.version)

    async def deregister(self) -> None:
        """Tell the control plane to remove this instance now (on shutdown); no heartbeat or
        reconnect follows that could bring it back."""
        self._stopping = True
        if self._beats is not None:
            self._beats.cancel()
        ws = self._ws
        if ws is None or ws.closed:
            return
        try:
            async with asyncio.timeout(2.0):
                await ws.send_text(encode(Deregister()))
                await ws.close()
            log.info("deregistered %s/%s", self.service, self.instance)
        except (PeerError, OSError, TimeoutError) as e:
            log.warning("could not deregister: %s", e)


def _version_of(text: str) -> int:
    """A refused table's version, if its JSON says one (for the NACK)."""
    try:
        version = json.loads(text).get("version", 0)
    except (ValueError, AttributeError):
        return 0
    return version if isinstance(version, int) and version >= 0 else 0
