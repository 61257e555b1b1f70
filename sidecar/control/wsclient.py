"""A client WebSocket over asyncio streams: the I/O around ``websocket``'s frames.

``connect`` opens it (TCP, TLS, the upgrade; the caller's ``asyncio.timeout`` bounds it all).
``receive`` hands on whole messages and the server's close, answering pings on the way and
keeping the connection alive: after ``keepalive`` seconds with nothing from the server it sends
a ping, and if nothing comes within half that the connection counts as dead (as aiohttp's
``heartbeat``). Only ``receive`` reads, so pings are answered while a caller waits in it.
``close`` sends a close frame and waits for the server's; leaving ``async with`` closes too.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ssl
from types import TracebackType
from typing import Final

from sidecar.clock import Clock, SystemClock
from sidecar.control.httpclient import USER_AGENT, Target, read_head
from sidecar.control.httpclient import connect as open_connection
from sidecar.control.websocket import (
    CLOSE_ABNORMAL,
    CLOSE_NORMAL,
    ClientConnection,
    Close,
    Message,
    Ping,
    check_answer,
    handshake_request,
    new_key,
)
from sidecar.errors import FrameError, PeerError

READ_SIZE: Final = 64 * 1024
CLOSE_TIMEOUT: Final = 2.0
"""seconds ``async with`` waits for the server's close frame"""


class Due(enum.Enum):
    PING = "ping"
    DEAD = "dead"


class Keepalive:
    """When to ping a quiet server and when to give up on it (plain code; times in seconds
    on one clock)."""

    def __init__(self, every: float, now: float) -> None:
        self.every = every
        self.grace = every / 2
        self._last = now
        self._pinged: float | None = None

    def __repr__(self) -> str:
        return f"<Keepalive every {self.every:g}s{'' if self._pinged is None else ', pinged'}>"

    def received(self, now: float) -> None:
        """Something came from the server: it is alive."""
        self._last, self._pinged = now, None

    def wait(self, now: float) -> float:
        """Seconds until ``due`` has something to say."""
        if self._pinged is None:
            return max(0.0, self._last + self.every - now)
        return max(0.0, self._pinged + self.grace - now)

    def due(self, now: float) -> Due | None:
        """PING (and it counts as sent), DEAD, or nothing yet."""
        if self._pinged is not None:
            return Due.DEAD if now >= self._pinged + self.grace else None
        if now >= self._last + self.every:
            self._pinged = now
            return Due.PING
        return None


class WebSocket:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        frames: ClientConnection,
        *,
        keepalive: float | None = None,
        clock: Clock | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = frames
        self._clock = clock or SystemClock()
        self._keepalive = Keepalive(keepalive, self._clock.monotonic()) if keepalive else None
        self._reading = False
        self._ended = asyncio.Event()
        self.close_code: int | None = None
        """the server's close code, once it closed (1006: no close frame came)"""

    def __repr__(self) -> str:
        state = "ended" if self._ended.is_set() else "closing" if self.closed else "open"
        return f"<WebSocket {state} {self._frames!r}>"

    @property
    def closed(self) -> bool:
        """A close frame was sent, or the connection is gone: nothing more can be sent."""
        return self._frames.close_sent or self._ended.is_set()

    async def send_text(self, text: str) -> None:
        if self.closed:
            raise ConnectionResetError("the stream is closed")
        await self._write(self._frames.text(text))

    async def receive(self) -> Message | Close:
        """The next message, or the server's close (``Close(1006, "")`` for a connection that
        ended without one). A frame RFC 6455 forbids closes the stream with its code and
        raises FrameError; a server that stopped answering raises PeerError."""
        self._reading = True
        try:
            return await self._receive()
        finally:
            self._reading = False

    async def _receive(self) -> Message | Close:
        while True:
            try:
                event = self._frames.next_event()
            except FrameError as e:
                await self._fail(e.code, str(e))
                raise
            if event is None:
                data = await self._read()
                if not data:
                    self._end(CLOSE_ABNORMAL)
                    return Close(CLOSE_ABNORMAL, "")
                self._frames.receive_data(data)
            elif isinstance(event, Ping):
                if not self.closed:
                    await self._write(self._frames.pong(event.payload))
            elif isinstance(event, Close):
                if not self.closed:  # the answer to its close echoes the code (RFC 6455 5.5.1)
                    await self._write(self._frames.close(event.code, ""))
                self._end(event.code)
                return event
            elif isinstance(event, Message):
                return event

    async def _read(self) -> bytes:
        """The next bytes from the server (b"" at the end), pinging it when it is quiet."""
        keepalive = self._keepalive
        while True:
            wait = keepalive.wait(self._clock.monotonic()) if keepalive else None
            try:
                async with asyncio.timeout(wait):
                    data = await self._reader.read(READ_SIZE)
            except ConnectionError:  # reset (a killed peer with bytes unread): the end, too
                self._end(CLOSE_ABNORMAL)
                return b""
            except TimeoutError:
                assert keepalive is not None
                due = keepalive.due(self._clock.monotonic())
                if due is Due.DEAD:
                    self._end(CLOSE_ABNORMAL)
                    raise PeerError(
                        f"no answer to a keepalive ping within {keepalive.grace:g} s"
                    ) from None
                if due is Due.PING and not self.closed:
                    await self._write(self._frames.ping())
                continue
            if keepalive is not None:
                keepalive.received(self._clock.monotonic())
            return data

    async def close(self, code: int = CLOSE_NORMAL, reason: str = "") -> None:
        """Send a close frame and wait until the server answers it or the connection ends;
        the caller bounds the wait. The connection is closed at the end either way."""
        if self._ended.is_set():
            return
        try:
            if not self._frames.close_sent:
                await self._write(self._frames.close(code, reason))
            if self._reading:  # another task's receive() reads the answer
                await self._ended.wait()
                return
            with contextlib.suppress(PeerError):
                while not isinstance(await self.receive(), Close):
                    pass
        finally:
            self._end(self.close_code)

    async def _fail(self, code: int, reason: str) -> None:
        """Close the stream at once with ``code``: the server broke the protocol."""
        with contextlib.suppress(OSError):
            if not self._frames.close_sent:
                await self._write(self._frames.close(code, reason))
        self._end(CLOSE_ABNORMAL)

    async def _write(self, frame: bytes) -> None:
        if self._writer.transport.is_closing():  # (uvloop raises RuntimeError on a write)
            raise ConnectionResetError("the connection is closed")
        self._writer.write(frame)
        await self._writer.drain()

    def _end(self, code: int | None) -> None:
        if not self._ended.is_set():
            self.close_code = code
            self._writer.close()
            self._ended.set()

    async def __aenter__(self) -> WebSocket:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.close()


async def connect(
    url: str,
    *,
    headers: dict[str, str],
    tls: ssl.SSLContext | None,
    max_message: int,
    keepalive: float | None = None,
    clock: Clock | None = None,
    address: str = "",
) -> WebSocket:
    """A WebSocket to ``url`` (``ws://`` or ``wss://``, verified with ``tls``), with
    ``headers`` on the upgrade; at ``address`` if given (the URL's host still names it in
    ``Host`` and the TLS checks). Raises ConnectError, ssl.SSLCertVerificationError (an
    untrusted certificate), HandshakeError (not upgraded) or PeerError."""
    target = Target.of(url)
    reader, writer = await open_connection(target, tls, address)
    try:
        key = new_key()
        writer.write(handshake_request(target, key, {"User-Agent": USER_AGENT} | headers))
        check_answer(await read_head(reader), key)
    except BaseException:
        writer.close()
        raise
    frames = ClientConnection(max_message)
    return WebSocket(reader, writer, frames, keepalive=keepalive, clock=clock)
