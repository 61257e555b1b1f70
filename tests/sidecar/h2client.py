"""An HTTP/2 client for tests, on the ``h2`` library: well-behaved (``H2Client``), or raw frames
for the attacks a sidecar must refuse (``frames``, ``send_raw``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import hpack
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import (
    DataReceived,
    InformationalResponseReceived,
    ResponseReceived,
    StreamEnded,
    StreamReset,
    TrailersReceived,
)
from hyperframe.frame import (
    ContinuationFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

LOCAL = "127.0.0.1"
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
Headers = Sequence[tuple[bytes, bytes]]


@dataclass
class H2Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    data_frames: list[int] = field(default_factory=list)  # the length of each DATA frame
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset
    interim: list[int] = field(default_factory=list)  # 1xx statuses before the answer
    interim_seen: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)


class H2Client:
    """One h2c connection (prior knowledge). ``auto_ack``: give window back as data comes
    (False: the client reads the socket but never lets the server send more)."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, auto_ack: bool = True
    ) -> None:
        self.reader, self.writer = reader, writer
        self.conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        self.auto_ack = auto_ack
        self.responses: dict[int, H2Response] = {}
        self.sent: dict[int, int] = {}  # request body bytes sent, by stream
        self.goaway: int | None = None
        self.closed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, port: int, auto_ack: bool = True) -> H2Client:
        reader, writer = await asyncio.open_connection(LOCAL, port)
        client = cls(reader, writer, auto_ack)
        client.conn.initiate_connection()
        client.flush()
        client._task = asyncio.create_task(client._read())
        return client

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    async def close(self) -> None:
        self.writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._task

    def start(
        self,
        path: str,
        *,
        method: str = "GET",
        authority: str = "svc",
        headers: Headers = (),
        end: bool = True,
    ) -> int:
        """Open a stream; its id."""
        sid = self.conn.get_next_available_stream_id()
        head = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *headers,
        ]
        self.responses[sid] = H2Response()
        self.conn.send_headers(sid, head, end_stream=end)
        self.flush()
        return sid

    async def send_body(self, sid: int, body: bytes, *, end: bool = True) -> None:
        """The body, as fast as the server's windows allow."""
        view = memoryview(body)
        while view:
            window = self.conn.local_flow_control_window(sid)
            room = min(window, self.conn.max_outbound_frame_size, len(view))
            if room <= 0:
                await asyncio.sleep(0.005)
                continue
            self.conn.send_data(sid, view[:room].tobytes())
            self.sent[sid] = self.sent.get(sid, 0) + room
            view = view[room:]
            self.flush()
            await self.writer.drain()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    async def request(
        self,
        path: str,
        *,
        method: str = "GET",
        authority: str = "svc",
        headers: Headers = (),
        body: bytes = b"",
        trailers: Headers = (),
        within: float = 10,
    ) -> H2Response:
        sid = self.start(
            path,
            method=method,
            authority=authority,
            headers=headers,
            end=not body and not trailers,
        )
        if body:
            await self.send_body(sid, body, end=not trailers)
        if trailers:
            self.conn.send_headers(sid, trailers, end_stream=True)
            self.flush()
        return await self.response(sid, within)

    async def response(self, sid: int, within: float = 10) -> H2Response:
        resp = self.responses[sid]
        async with asyncio.timeout(within):
            await resp.done.wait()
        return resp

    async def _read(self) -> None:
        pending = b""
        try:
            while data := await self.reader.read(65536):
                pending += data
                frames, pending = self._without_goaway(pending)
                for event in self.conn.receive_data(frames):
                    self._on_event(event)
                self.flush()
        finally:
            self.closed.set()
            for resp in self.responses.values():
                resp.done.set()

    def _without_goaway(self, data: bytes) -> tuple[bytes, bytes]:
        """The whole frames of ``data`` but a GOAWAY (its code kept: the codec would take no
        frame after it, and a server finishes its streams after a graceful one), and the rest."""
        kept, pos = [], 0
        while pos + 9 <= len(data):
            end = pos + 9 + int.from_bytes(data[pos : pos + 3], "big")
            if end > len(data):
                break
            if data[pos + 3] == 0x7:
                self.goaway = int.from_bytes(data[pos + 13 : pos + 17], "big")
            else:
                kept.append(data[pos:end])
            pos = end
        return b"".join(kept), data[pos:]

    def _on_event(self, event: object) -> None:
        if isinstance(event, ResponseReceived):
            resp = self.responses[event.stream_id]
            resp.headers = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
            resp.status = int(dict(resp.headers)[b":status"])
        elif isinstance(event, InformationalResponseReceived):
            resp = self.responses[event.stream_id]
            resp.interim.append(int(dict(event.headers or ())[b":status"]))
            resp.interim_seen.set()
        elif isinstance(event, DataReceived):
            resp = self.responses[event.stream_id]
            resp.body += event.data or b""
            resp.data_frames.append(len(event.data or b""))
            if self.auto_ack:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, TrailersReceived):
            trailers = [(bytes(n), bytes(v)) for n, v in event.headers or ()]
            self.responses[event.stream_id].trailers = trailers
        elif isinstance(event, StreamEnded):
            self.responses[event.stream_id].done.set()
        elif isinstance(event, StreamReset):
            resp = self.responses[event.stream_id]
            resp.reset = int(event.error_code or 0)
            resp.done.set()


# -- raw frames, for what a well-behaved client would never send --------------------------------


def request_block(
    encoder: hpack.Encoder, path: str = "/echo", authority: str = "svc", extra: Headers = ()
) -> bytes:
    return encoder.encode(
        [
            (b":method", b"GET"),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", path.encode()),
            *extra,
        ]
    )


def headers_frame(
    sid: int, block: bytes, *, end_stream: bool = True, end_headers: bool = True
) -> bytes:
    f = HeadersFrame(sid)
    f.data = block
    if end_stream:
        f.flags.add("END_STREAM")
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def continuation_frame(sid: int, block: bytes, *, end_headers: bool = False) -> bytes:
    f = ContinuationFrame(sid)
    f.data = block
    if end_headers:
        f.flags.add("END_HEADERS")
    return f.serialize()


def rst_frame(sid: int, code: int = 0x8) -> bytes:
    f = RstStreamFrame(sid)
    f.error_code = code
    return f.serialize()


def settings_frame() -> bytes:
    return SettingsFrame(0).serialize()


def ping_frame(n: int) -> bytes:
    f = PingFrame(0)
    f.opaque_data = n.to_bytes(8, "big")
    return f.serialize()


async def send_raw(port: int, data: bytes, within: float = 10) -> list[Frame]:
    """The preface and ``data``; the frames the server sent until it closed."""
    reader, writer = await asyncio.open_connection(LOCAL, port)
    writer.write(PREFACE + settings_frame() + data)
    got = bytearray()
    try:
        async with asyncio.timeout(within):
            while chunk := await reader.read(65536):
                got += chunk
    except ConnectionResetError:
        pass
    finally:
        writer.close()
    return parse_frames(bytes(got))


def parse_frames(data: bytes) -> list[Frame]:
    frames: list[Frame] = []
    pos = 0
    while pos + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    return frames


def goaway_code(frames: list[Frame]) -> int | None:
    codes = [f.error_code for f in frames if isinstance(f, GoAwayFrame)]
    return codes[-1] if codes else None
