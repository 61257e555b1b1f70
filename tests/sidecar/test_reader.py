"""The HTTP/1 reading state both sides of the proxy share: heads and trailer sections held
to the limits across reads, without sockets (httptools fed by hand)."""

from __future__ import annotations

import httptools
import pytest

from sidecar.http.http1 import MAX_HEAD_BYTES, MAX_HEADERS
from sidecar.http.reader import HeadReader


class TooLarge(Exception):
    pass


class Reading:
    """A connection's parser callbacks, as the listener and the upstream connection make
    them: the reader's bookkeeping, and what the limits refused."""

    def __init__(self, response: bool = False) -> None:
        self.reader = HeadReader()
        self.parser: httptools.HttpRequestParser | httptools.HttpResponseParser = (
            httptools.HttpResponseParser(self) if response else httptools.HttpRequestParser(self)
        )
        self.url = b""
        self.lines: list[bytes] = []  # the head's, as a proxy would forward them
        self.heads = 0
        self.trailers: list[bytes] = []
        self.error: str | None = None
        if response:
            self.reader.expect_head()

    def feed(self, data: bytes) -> bool:
        """One read; False when it was refused."""
        self.reader.read_started(len(data))
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError:
            return False
        if not self.reader.read_ended(len(data)):
            self.error = "section too large"
            return False
        return True

    def on_message_begin(self) -> None:
        self.url = b""
        self.lines = []
        self.reader.message_begin()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.reader.in_head:
            self.lines.append(b"%s: %s\r\n" % (name, value))
            return
        self.error = self.reader.trailer(name, value)
        if self.error:
            raise TooLarge
        self.trailers.append(name)

    def on_headers_complete(self) -> None:
        self.error = self.reader.head_complete(self.lines, 0, len(self.url))
        if self.error:
            raise TooLarge
        self.heads += 1

    def on_body(self, data: bytes) -> None:
        self.reader.body()

    def on_chunk_header(self) -> None:
        self.reader.chunk_header()

    def on_chunk_complete(self) -> None:
        self.reader.chunk_complete()


def test_heads_within_the_limits_pass() -> None:
    r = Reading()
    assert r.feed(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n" * 3)
    assert (r.heads, r.reader.in_head) == (3, False)


def test_too_many_headers() -> None:
    r = Reading()
    lines = b"".join(b"x-%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
    assert not r.feed(b"GET / HTTP/1.1\r\n" + lines + b"\r\n")
    assert r.error == f"more than {MAX_HEADERS} headers"


def test_one_huge_header_line() -> None:
    r = Reading()
    assert not r.feed(b"GET / HTTP/1.1\r\nx: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
    assert r.error == f"head larger than {MAX_HEAD_BYTES} bytes"


def test_a_head_growing_over_many_reads_is_refused_before_it_ends() -> None:
    r = Reading()
    assert r.feed(b"GET / HTTP/1.1\r\n")
    chunk = b"x-a: " + b"a" * 1000 + b"\r\n"
    fed = 0
    while r.feed(chunk):
        fed += 1
        assert fed < 100
    assert r.error == "section too large"
    assert 60 <= fed <= 66  # refused within one read of 64 KiB


def test_a_read_ending_inside_a_head_counts_only_that_head() -> None:
    """test_a_read_ending_inside_a_head_counts_only_that_head: whole requests before it in
    the same read are not counted with it"""
    r = Reading()
    filler = b"GET / HTTP/1.1\r\nHost: a\r\nx: " + b"a" * 30_000 + b"\r\n\r\n"
    assert r.feed(filler * 3 + b"GET / HTTP/1.1\r\nHost: a\r\n")
    assert r.feed(b"x: 1\r\n\r\n")
    assert r.heads == 4


def test_trailers_are_held_to_the_limits() -> None:
    head = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
    r = Reading()
    assert r.feed(head + b"t1: a\r\nt2: b\r\n\r\n")
    assert r.trailers == [b"t1", b"t2"]
    many = Reading()
    lines = b"".join(b"t%d: 1\r\n" % i for i in range(MAX_HEADERS + 1))
    assert not many.feed(head + lines + b"\r\n")
    assert many.error == "too many trailers"
    large = Reading()
    assert not large.feed(head + b"t: " + b"a" * MAX_HEAD_BYTES + b"\r\n\r\n")
    assert large.error == f"trailer section larger than {MAX_HEAD_BYTES} bytes"


def test_a_read_ending_after_a_chunk_header_is_not_a_trailer_section() -> None:
    """test_an_upstream_read_ending_after_a_chunk_header_is_no_protocol_error"""
    r = Reading(response=True)
    assert r.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4000\r\n")
    for _ in range(20):  # 20 x 16 KiB of body, well over the head limit
        assert r.feed(b"a" * 0x4000 + b"\r\n4000\r\n")
    assert not r.reader.in_head


@pytest.mark.parametrize("response", [False, True])
def test_repr(response: bool) -> None:
    r = Reading(response)
    assert repr(r.reader).startswith("<HeadReader head" if response else "<HeadReader body")
