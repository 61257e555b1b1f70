"""What reading HTTP/1 messages off one connection keeps beside the parser, for the client
side and the upstream side alike: the head being read, and the limits on heads and trailer
sections (``MAX_HEADERS`` lines, ``MAX_HEAD_BYTES``).

httptools joins a header line before it calls back, so a head's size is counted by the reads
it spans: the read it began in only as an upper bound at its end (it may hold whole messages
before the head), the reads after it whole. A head that may be too large by that count is
measured exactly once it is complete. A trailer section (after a chunked body's last chunk)
is counted the same way while it comes, and line by line as the parser delivers it.

The connection calls ``read_started`` before it feeds a read to its parser, the parser's
callbacks call the methods named after them, and ``read_ended`` after the read: False (or an
error string from ``head_complete`` and ``trailer``) means the message is over the limits.
"""

from __future__ import annotations

from sidecar.http.http1 import MAX_HEAD_BYTES, MAX_HEADERS


class HeadReader:
    """One connection's HTTP/1 reading state."""

    __slots__ = (
        "began",
        "in_head",
        "raw_count",
        "raw_first",
        "read",
        "trailer_count",
        "trailer_size",
        "trailer_watch",
    )

    def __init__(self) -> None:
        self.in_head = False
        """waiting for (the rest of) a head"""
        self.trailer_watch = False
        """after a chunk header with no data since: what follows may be trailers"""
        self.raw_count = 0
        """bytes of the reads wholly inside the head or trailer section"""
        self.raw_first = 0
        """the size of the read the head or trailer section began in (before this one)"""
        self.began = False
        """a head or trailer section began since a read last ended inside one"""
        self.read = 0
        """the size of the read being parsed"""
        self.trailer_count = 0
        self.trailer_size = 0

    def __repr__(self) -> str:
        where = "head" if self.in_head else "trailers?" if self.trailer_watch else "body"
        return f"<HeadReader {where} [{self.raw_count} bytes]>"

    def expect_head(self) -> None:
        """A head is due (a request was sent upstream, or after an interim response)."""
        self.in_head = True
        self.raw_count = self.raw_first = 0

    def read_started(self, n: int) -> None:
        self.read = n

    def read_ended(self, n: int) -> bool:
        """The read of ``n`` bytes was parsed; False when the head or trailer section it
        ended inside has grown over ``MAX_HEAD_BYTES``."""
        if not (self.in_head or self.trailer_watch):
            return True
        if self.began:  # (set when one begins; a section closed since does not matter)
            self.began = False
            self.raw_first = n  # (it may hold whole messages before the section began)
            return True
        self.raw_count += n
        return self.raw_count <= MAX_HEAD_BYTES

    # -- the parser's callbacks -----------------------------------------------------------

    def message_begin(self) -> None:
        self.trailer_count = self.trailer_size = 0
        self.raw_count = 0  # (and raw_first, when the last head was counted)
        self.began = True
        self.in_head = True

    def head_complete(self, lines: list[bytes], unlisted: int, unlisted_bytes: int) -> str | None:
        """The head's last header came: its ``lines`` (``name: value\\r\\n`` each), and
        ``unlisted`` more of ``unlisted_bytes`` (the start line's target counted with
        them); None when it is within the limits, else what is wrong."""
        if len(lines) + unlisted > MAX_HEADERS:
            return f"more than {MAX_HEADERS} headers"
        if (  # the head took at most the reads it spans
            self.raw_count + self.raw_first + self.read > MAX_HEAD_BYTES
            and sum(map(len, lines)) + unlisted_bytes > MAX_HEAD_BYTES
        ):
            return f"head larger than {MAX_HEAD_BYTES} bytes"
        self.in_head = False
        self.raw_count = self.raw_first = 0
        self.trailer_count = self.trailer_size = 0
        return None

    def trailer(self, name: bytes, value: bytes) -> str | None:
        """A trailer line; None when the section is within the limits, else what is wrong."""
        self.trailer_watch = True  # still in the trailer section
        self.trailer_count += 1
        self.trailer_size += len(name) + len(value) + 4
        if self.trailer_count > MAX_HEADERS:
            return "too many trailers"
        if self.trailer_size > MAX_HEAD_BYTES:
            return f"trailer section larger than {MAX_HEAD_BYTES} bytes"
        return None

    def body(self) -> None:
        self.trailer_watch = False
        self.raw_count = 0

    def chunk_header(self) -> None:
        self.trailer_watch = True  # data resets it; a last chunk's trailers do not
        self.raw_count = self.raw_first = 0
        self.began = True

    def chunk_complete(self) -> None:
        self.trailer_watch = False
        self.raw_count = 0
