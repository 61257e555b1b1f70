"""The client side of RFC 6455 (WebSocket), without I/O: bytes in, events out, and the bytes
to send. ``wsclient`` moves them over a connection.

The handshake: ``handshake_request`` is the upgrade request; ``check_answer`` accepts only a
101 with ``Upgrade: websocket``, ``Connection: upgrade`` and the ``Sec-WebSocket-Accept`` that
the key asks for, and no extension or subprotocol (none was offered).

Frames: what the client sends is masked (a fresh 4-byte key each); what the server sends must
not be. Text and binary messages may come in fragments and are handed on whole; pings, pongs
and the close frame may come between the fragments. A message over ``max_message`` bytes is
refused as soon as a frame header announces it, before its payload is read (close code 1009);
a frame RFC 6455 forbids closes with 1002, a text message that is not UTF-8 with 1007.
``ClientConnection.next_event`` raises those as FrameError; the caller sends ``close(e.code)``.
"""

from __future__ import annotations

import base64
import enum
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sidecar.control.httpclient import ResponseHead, Target, request_head
from sidecar.errors import FrameError, HandshakeError

GUID: Final = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
"""RFC 6455 1.3: appended to the key to make the accept value"""

CLOSE_NORMAL: Final = 1000
CLOSE_PROTOCOL_ERROR: Final = 1002
CLOSE_ABNORMAL: Final = 1006
"""never sent: what a connection that ended without a close frame is reported as"""
CLOSE_INVALID_DATA: Final = 1007
CLOSE_TOO_BIG: Final = 1009


class Opcode(enum.IntEnum):
    CONTINUATION = 0x0
    TEXT = 0x1
    BINARY = 0x2
    CLOSE = 0x8
    PING = 0x9
    PONG = 0xA


@dataclass(frozen=True, slots=True)
class Message:
    """A whole text (``str``) or binary (``bytes``) message, its fragments joined."""

    data: str | bytes


@dataclass(frozen=True, slots=True)
class Ping:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Pong:
    payload: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """The peer's close frame: its code (None: it gave none) and reason."""

    code: int | None
    reason: str


Event = Message | Ping | Pong | Close


# -- the handshake ---------------------------------------------------------------------------


def new_key(random: Callable[[int], bytes] = os.urandom) -> str:
    return base64.b64encode(random(16)).decode("ascii")


def accept_for(key: str) -> str:
    """The ``Sec-WebSocket-Accept`` a server must answer ``key`` with."""
    digest = hashlib.sha1((key + GUID).encode("ascii"), usedforsecurity=False).digest()
    return base64.b64encode(digest).decode("ascii")


def handshake_request(target: Target, key: str, headers: dict[str, str]) -> bytes:
    """The upgrade request for ``target`` with ``key``, and ``headers`` besides."""
    upgrade = {
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
    }
    return request_head("GET", target, upgrade | headers)


def check_answer(head: ResponseHead, key: str) -> None:
    """Raise HandshakeError unless ``head`` opens a WebSocket for ``key``."""
    if head.status != 101:
        raise HandshakeError(head.status, f"HTTP {head.status} {head.reason}".rstrip())
    h = head.headers
    if h.get("upgrade", "").lower() != "websocket":
        wrong = "no Upgrade: websocket"
    elif "upgrade" not in (t.strip().lower() for t in h.get("connection", "").split(",")):
        wrong = "no Connection: upgrade"
    elif h.get("sec-websocket-accept") != accept_for(key):
        wrong = "a Sec-WebSocket-Accept that does not match the key"
    elif h.get("sec-websocket-extensions"):
        wrong = f"an extension that was not asked for ({h['sec-websocket-extensions']})"
    elif h.get("sec-websocket-protocol"):
        wrong = f"a subprotocol that was not asked for ({h['sec-websocket-protocol']})"
    else:
        return
    raise HandshakeError(101, f"the answer to the WebSocket upgrade has {wrong}")


# -- frames ----------------------------------------------------------------------------------


def encode_frame(opcode: Opcode, payload: bytes, mask: bytes) -> bytes:
    """One final frame, masked with the 4 bytes of ``mask`` (as every client frame is)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 1 << 16:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + mask + _masked(payload, mask)


def _masked(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    if not n:
        return b""
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def close_payload(code: int | None, reason: str) -> bytes:
    if code is None:
        return b""
    return code.to_bytes(2, "big") + reason.encode()[:123]


def _close_code_allowed(code: int) -> bool:
    """RFC 6455 7.4 and the IANA registry: what a close frame may carry."""
    return code in (1000, 1001, 1002, 1003) or 1007 <= code <= 1014 or 3000 <= code <= 4999


class ClientConnection:
    """One client WebSocket's frames, no I/O: ``receive_data`` what came, ``next_event`` until
    None; ``text``, ``ping``, ``pong`` and ``close`` return the bytes to send."""

    def __init__(self, max_message: int, random: Callable[[int], bytes] = os.urandom) -> None:
        self.max_message = max_message
        self._random = random
        self._buffer = bytearray()
        self._opcode: Opcode | None = None
        """the message being read (TEXT or BINARY); None between messages"""
        self._fragments = bytearray()
        self._frame: tuple[Opcode, bool, int] | None = None
        """the frame whose payload is being read: opcode, final, bytes still to come"""
        self._control = bytearray()
        self.close_received: Close | None = None
        self.close_sent = False

    def __repr__(self) -> str:
        closes = (self.close_received is not None) + self.close_sent
        state = ("open", "closing", "closed")[closes]
        reading = f", {len(self._fragments)} bytes of a message" if self._opcode else ""
        return f"<ClientConnection {state}{reading}>"

    # -- sending ----------------------------------------------------------------------------

    def text(self, text: str) -> bytes:
        return self._frame_out(Opcode.TEXT, text.encode())

    def ping(self, payload: bytes = b"") -> bytes:
        return self._frame_out(Opcode.PING, payload)

    def pong(self, payload: bytes) -> bytes:
        return self._frame_out(Opcode.PONG, payload)

    def close(self, code: int | None = CLOSE_NORMAL, reason: str = "") -> bytes:
        """The close frame (once; b"" after that)."""
        if self.close_sent:
            return b""
        frame = self._frame_out(Opcode.CLOSE, close_payload(code, reason))
        self.close_sent = True
        return frame

    def _frame_out(self, opcode: Opcode, payload: bytes) -> bytes:
        assert not self.close_sent, "nothing may follow a close frame"
        return encode_frame(opcode, payload, self._random(4))

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        if self.close_received is None:  # after a close frame, nothing more is read
            self._buffer += data

    def next_event(self) -> Event | None:
        """The next whole event in what has been received, or None until more comes."""
        while self.close_received is None:
            if self._frame is None and not self._read_header():
                return None
            assert self._frame is not None
            opcode, final, left = self._frame
            into = self._control if opcode >= Opcode.CLOSE else self._fragments
            take = min(left, len(self._buffer))
            into += self._buffer[:take]
            del self._buffer[:take]
            if take < left:
                self._frame = (opcode, final, left - take)
                return None
            self._frame = None
            if opcode >= Opcode.CLOSE:
                return self._control_event(opcode)
            if final:
                return self._message()
        return None

    def _read_header(self) -> bool:
        """Take a whole frame header off the buffer into ``_frame``; False if not all here."""
        buf = self._buffer
        if len(buf) < 2:
            return False
        first, second = buf[0], buf[1]
        size, at = second & 0x7F, 2
        if size == 126:
            size, at = int.from_bytes(buf[2:4], "big"), 4
        elif size == 127:
            size, at = int.from_bytes(buf[2:10], "big"), 10
        if len(buf) < at:
            return False
        opcode = self._check(first, second, size)
        final = bool(first & 0x80)
        del buf[:at]
        if opcode in (Opcode.TEXT, Opcode.BINARY):
            self._opcode = opcode
        self._frame = (opcode, final, size)
        return True

    def _check(self, first: int, second: int, size: int) -> Opcode:
        """The frame's opcode, if RFC 6455 and the size limit allow the frame."""
        if first & 0x70:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a frame with RSV bits set (no extension)")
        if second & 0x80:
            raise FrameError(CLOSE_PROTOCOL_ERROR, "a masked frame from the server")
        try:
            opcode = Opcode(first & 0x0F)
        except ValueError:
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"unknown opcode {first & 0x0F}") from None
        if opcode >= Opcode.CLOSE:
            if not first & 0x80 or size > 125:
                raise FrameError(CLOSE_PROTOCOL_ERROR, f"a fragmented or long {opcode.name} frame")
            return opcode
        if (opcode is Opcode.CONTINUATION) != (self._opcode is not None):
            said = "a continuation with no message" if self._opcode is None else "a new message"
            raise FrameError(CLOSE_PROTOCOL_ERROR, f"{said} in the middle of a fragmented one")
        total = len(self._fragments) + size
        if total > self.max_message:
            raise FrameError(
                CLOSE_TOO_BIG,
                f"a message of {total} bytes or more (the limit is {self.max_message})",
            )
        return opcode

    def _message(self) -> Message:
        opcode, raw = self._opcode, self._fragments
        self._opcode, self._fragments = None, bytearray()
        if opcode is Opcode.BINARY:
            return Message(bytes(raw))
        try:
            return Message(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise FrameError(CLOSE_INVALID_DATA, "a text message that is not UTF-8") from None

    def _control_event(self, opcode: Opcode) -> Event:
        payload = bytes(self._control)
        self._control.clear()
        if opcode is Opcode.PING:
            return Ping(payload)
        if opcode is Opcode.PONG:
            return Pong(payload)
        self.close_received = close = _parse_close(payload)
        self._buffer.clear()
        return close


def _parse_close(payload: bytes) -> Close:
    if not payload:
        return Close(None, "")
    code = int.from_bytes(payload[:2], "big")
    if len(payload) < 2 or not _close_code_allowed(code):
        raise FrameError(CLOSE_PROTOCOL_ERROR, f"a close frame with code {code}")
    try:
        return Close(code, payload[2:].decode("utf-8"))
    except UnicodeDecodeError:
        raise FrameError(CLOSE_INVALID_DATA, "a close reason that is not UTF-8") from None
