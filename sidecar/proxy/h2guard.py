"""What an HTTP/2 client may ask of one connection, watched frame by frame before the codec
sees it (``FrameWatch``): the attacks of recent years, each refused with a GOAWAY.

- rapid reset (CVE-2023-44487): streams opened and reset at once cost the server a request
  each and the client nothing; more than ``resets_per_s`` RST_STREAM frames in a second;
- CONTINUATION flood (2024): a header block that never ends, held in memory until it does;
  more than ``header_block_bytes`` of one encoded block;
- SETTINGS and PING floods: each answered with an ACK the client need not read; more than
  ``settings_per_s`` / ``pings_per_s`` a second.

Each is ENHANCE_YOUR_CALM. What the ``h2`` codec refuses itself (streams over
``max_streams``: PROTOCOL_ERROR; a decoded header list over its 64 KiB: ENHANCE_YOUR_CALM)
is counted by the connection under the reasons here.

Pure decisions on the time given: the watch reads the frame headers of the bytes it is fed
(9 bytes each, payloads skipped) and says which limit they broke, if any.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

#: the client connection preface, before its first frame (RFC 9113 3.4)
PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
#: GOAWAY error codes (RFC 9113 7)
PROTOCOL_ERROR: Final = 0x1
ENHANCE_YOUR_CALM: Final = 0xB

# frame types and flags (RFC 9113 6)
_HEADERS: Final = 0x1
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PING: Final = 0x6
_CONTINUATION: Final = 0x9
_ACK: Final = 0x1
_END_HEADERS: Final = 0x4

#: the reasons a connection is refused, as ``meshlet_h2_refused_total`` labels them
REASONS: Final = (
    "max_streams",
    "rapid_reset",
    "header_block",
    "header_list",
    "settings_flood",
    "ping_flood",
    "protocol",
)


@dataclass(frozen=True, slots=True)
class H2Limits:
    max_streams: int = 100
    """streams one client connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS)"""
    header_block_bytes: int = 64 * 1024
    """bytes of one encoded header block (HEADERS and its CONTINUATION frames)"""
    header_list_bytes: int = 64 * 1024
    """bytes of one decoded header list, as HPACK counts them (SETTINGS_MAX_HEADER_LIST_SIZE)"""
    resets_per_s: int = 100
    """RST_STREAM frames a client may send in one second"""
    settings_per_s: int = 50
    """SETTINGS frames (not ACKs) a client may send in one second"""
    pings_per_s: int = 50
    """PING frames (not ACKs) a client may send in one second"""

    def __post_init__(self) -> None:
        for name, value in (
            ("max_streams", self.max_streams),
            ("header_block_bytes", self.header_block_bytes),
            ("header_list_bytes", self.header_list_bytes),
            ("resets_per_s", self.resets_per_s),
            ("settings_per_s", self.settings_per_s),
            ("pings_per_s", self.pings_per_s),
        ):
            if value < 1:
                raise ValueError(f"{name} must be at least 1")


class H2Counters:
    """What a listener's HTTP/2 clients did, since the start (``meshlet_h2_*`` metrics)."""

    __slots__ = ("connections", "refused", "streams")

    def __init__(self) -> None:
        self.connections = 0  # connections that opened with the preface
        self.streams = 0  # streams (requests) they opened
        #: connections refused, by reason (``REASONS``)
        self.refused: dict[str, int] = dict.fromkeys(REASONS, 0)

    def __repr__(self) -> str:
        return f"<H2Counters [{self.connections} connections, {self.streams} streams]>"


class FrameWatch:
    """The frame headers of one client connection's bytes, against its ``H2Limits``."""

    __slots__ = (
        "_block",
        "_head",
        "_limits",
        "_pings",
        "_preface",
        "_resets",
        "_settings",
        "_skip",
        "_window",
    )

    def __init__(self, limits: H2Limits) -> None:
        self._limits = limits
        self._preface = len(PREFACE)  # bytes of the preface still to pass over
        self._skip = 0  # bytes of the current frame's payload still to pass over
        self._head = b""  # a frame header cut by the end of a read
        self._block = -1  # bytes of the header block being read (-1: none)
        self._window = -1.0  # the second the counts below are for (loop time it began)
        self._resets = self._settings = self._pings = 0

    def __repr__(self) -> str:
        return (
            f"<FrameWatch [{self._resets} resets, {self._settings} settings, "
            f"{self._pings} pings this second]>"
        )

    def feed(self, data: bytes, now: float) -> str | None:
        """The next bytes the client sent, at ``now`` (seconds): the reason (``REASONS``)
        of the limit they broke, or None."""
        if now - self._window >= 1.0:
            self._window = now
            self._resets = self._settings = self._pings = 0
        pos, end = 0, len(data)
        if self._preface:
            pos = min(self._preface, end)
            self._preface -= pos
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            need = 9 - len(self._head)
            header = self._head + data[pos : pos + need]
            pos += need
            if len(header) < 9:
                self._head = header
                return None
            self._head = b""
            refused = self._frame(int.from_bytes(header[:3], "big"), header[3], header[4])
            if refused is not None:
                return refused
        return None

    def _frame(self, length: int, kind: int, flags: int) -> str | None:
        """One frame's header: what it adds to the counts, and the limit broken if any."""
        self._skip = length
        limits = self._limits
        if kind in (_HEADERS, _CONTINUATION):
            block = (0 if kind == _HEADERS else max(self._block, 0)) + length
            self._block = -1 if flags & _END_HEADERS else block
            if block > limits.header_block_bytes:
                return "header_block"
        elif kind == _RST_STREAM:
            self._resets += 1
            if self._resets > limits.resets_per_s:
                return "rapid_reset"
        elif kind == _SETTINGS and not flags & _ACK:
            self._settings += 1
            if self._settings > limits.settings_per_s:
                return "settings_flood"
        elif kind == _PING and not flags & _ACK:
            self._pings += 1
            if self._pings > limits.pings_per_s:
                return "ping_flood"
        return None
