"""An opaque TCP stream: a client connection's bytes to a destination and back, unparsed (an
intercepted connection that is not HTTP: ``intercept``).

The relay takes the client's transport over (``set_protocol``), opens its own connection,
holds what the client sends meanwhile (reading paused past ``HOLD`` bytes), then copies both
ways with back-pressure: a side that cannot write pauses the other's reading. A half close is
passed on (``write_eof``); the relay ends when both ways are closed, either side is lost, the
connect fails, or nothing moves either way for the idle timeout.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import cast

from sidecar.proxy.intercept import Interception

log = logging.getLogger("meshlet.proxy")

#: bytes held from the client while the destination's connection opens
HOLD = 64 * 1024


class _Side(asyncio.Protocol):
    """One of the relay's two connections."""

    __slots__ = ("other", "relay", "transport")

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: _Side | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.relay.moved += len(data)
        other = self.other
        if other is not None and other.transport is not None:
            other.transport.write(data)
        else:  # (the client, before the destination's connection is open)
            self.relay.hold(data)

    def eof_received(self) -> bool:
        return self.relay.half_closed(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.close()

    def pause_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and self.other.transport is not None:
            self.other.transport.resume_reading()


class Relay:
    """An intercepted client connection relayed, unparsed, to ``destination``."""

    __slots__ = (
        "_client_eof",
        "_closed",
        "_eofs",
        "_held",
        "_held_bytes",
        "_seen",
        "_task",
        "_timer",
        "client",
        "destination",
        "ended",
        "greeting",
        "interception",
        "loop",
        "moved",
        "opened",
        "refusal",
        "upstream",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        destination: tuple[str, int],
        interception: Interception,
        loop: asyncio.AbstractEventLoop,
        ended: Callable[[], None],
        *,
        greeting: bytes = b"",
        refusal: bytes = b"",
        opened: Callable[[bool], None] | None = None,
    ) -> None:
        self.destination = destination
        self.interception = interception
        self.loop = loop
        self.ended: Callable[[], None] | None = ended
        """called once, when the relay is over (the listener's count)"""
        self.greeting = greeting
        """written to the client once the destination's connection is open (CONNECT's 200)"""
        self.refusal = refusal
        """written to the client when it cannot be opened (CONNECT's 502)"""
        self.opened = opened
        """told whether the destination's connection opened"""
        self.client = _Side(self)
        self.client.transport = transport
        self.upstream = _Side(self)
        self.moved = 0
        self._seen = -1  # ``moved`` when the idle timer last looked
        self._held: list[bytes] = []
        self._held_bytes = 0
        self._eofs = 0
        self._client_eof = False
        self._closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        host, port = self.destination
        state = "closed" if self._closed else "open" if self.client.other else "connecting"
        return f"<Relay to {host}:{port} {state}, {self.moved} bytes>"

    def start(self, first: bytes) -> None:
        """Take the client's connection over (``first``: what it sent already) and connect."""
        transport = self.client.transport
        assert transport is not None
        transport.set_protocol(self.client)
        transport.resume_reading()  # (a CONNECT's client was paused while it waited its turn)
        if first:
            self.hold(first)
        # what the destination sends may come before the connect returns (a server that speaks
        # first, under uvloop): it goes to the client from the start
        self.upstream.other = self.client
        self._task = self.loop.create_task(self._connect())
        self._look()

    async def _connect(self) -> None:
        host, port = self.destination
        try:
            async with asyncio.timeout(self.interception.connect_timeout):
                await self.loop.create_connection(lambda: self.upstream, host, port)
        except (OSError, TimeoutError) as e:
            log.info("opaque stream to %s:%d: connect failed: %s", host, port, e or "timed out")
            if self.refusal and self.client.transport is not None:
                self.client.transport.write(self.refusal)
            self._tell(False)
            self.close()
            return
        upstream = self.upstream.transport
        assert upstream is not None
        if self._closed:  # (the client left as it opened)
            upstream.close()
            return
        held, self._held = self._held, []
        if self.greeting and self.client.transport is not None:
            self.client.transport.write(self.greeting)
        self._tell(True)
        for data in held:
            upstream.write(data)
        self.client.other = self.upstream
        if self._held_bytes > HOLD and self.client.transport is not None:
            self.client.transport.resume_reading()
        self._held_bytes = 0
        if self._client_eof:  # the client closed its way meanwhile
            if self._eofs >= 2:  # and so did the destination: over once what was held is out
                self.close()
            elif upstream.can_write_eof():
                upstream.write_eof()

    def _tell(self, opened: bool) -> None:
        tell, self.opened = self.opened, None
        if tell is not None:
            tell(opened)

    def hold(self, data: bytes) -> None:
        self._held.append(data)
        self._held_bytes += len(data)
        if self._held_bytes > HOLD and self.client.transport is not None:
            self.client.transport.pause_reading()

    def half_closed(self, side: _Side) -> bool:
        """``side`` will send no more: pass it on; True keeps the other way open."""
        self._eofs += 1
        other = side.other
        if other is None:  # (the client, before the destination's connection is open: what it
            self._client_eof = True  # sent is held, and goes first)
            return True
        if self._eofs >= 2:
            self.close()
            return False
        if other.transport is not None and other.transport.can_write_eof():
            other.transport.write_eof()
        return True

    def _look(self) -> None:
        """Every half idle timeout: close when nothing moved since the last look."""
        if self._closed:
            return
        if self.moved == self._seen:
            log.info("opaque stream to %s:%d idle: closed", *self.destination)
            self.close()
            return
        self._seen = self.moved
        self._timer = self.loop.call_later(self.interception.idle_timeout / 2, self._look)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._held = []
        for side in (self.client, self.upstream):
            if side.transport is not None:
                side.transport.close()
        ended, self.ended = self.ended, None
        if ended is not None:
            ended()
