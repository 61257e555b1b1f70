"""A response head read whole from its bytes decides as the same head read line by line."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http import framing, http1, http2
from sidecar.http.wholehead import whole_response_head

NGINX = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 29 Nov 2026 20:22:47 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 5\r\nConnection: keep-alive\r\n"
    b'ETag: "6a1b-5"\r\n\r\nhello'
)


class LineByLine:
    """The head as the upstream connection reads it line by line (parser callbacks)."""

    def __init__(self, data: bytes) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.reason = b""
        self.status = 0
        self.parser = httptools.HttpResponseParser(self)
        self.parser.feed_data(data)

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def head(self) -> http1.ResponseHead:
        return http1.parse_response_head(self.status, self.reason, self.headers)


def forwarded(resp: http1.ResponseHead) -> list[tuple[bytes, bytes]]:
    """The header lines the client gets, as (name, value) (spacing after the colon aside)."""
    out = http1.downstream_response(resp, chunked=False, keep_alive=True, client_version="1.1")
    lines = out.split(b"\r\n")[1:-2]
    return [(n, v.strip()) for n, _, v in (line.partition(b":") for line in lines)]


def whole(data: bytes) -> http1.ResponseHead | None:
    resp = http1.ResponseHead(0, b"")
    return resp if whole_response_head(data, resp) else None


def assert_same(data: bytes) -> http1.ResponseHead:
    whole_head = whole(data)
    assert whole_head is not None
    by_line = LineByLine(data).head()
    assert (
        whole_head.status,
        whole_head.reason,
        whole_head.close,
        whole_head.sized,
        whole_head.framing,
    ) == (
        by_line.status,
        by_line.reason,
        by_line.close,
        by_line.sized,
        by_line.framing,
    )
    assert forwarded(whole_head) == forwarded(by_line)
    return whole_head


def test_a_usual_head_is_forwarded_as_it_came_without_connection() -> None:
    resp = assert_same(NGINX)
    assert b"".join(resp.lines) == (
        b"Server: nginx\r\nDate: Sun, 29 Nov 2026 20:22:47 GMT\r\nContent-Type: text/plain\r\n"
        b'Content-Length: 5\r\nETag: "6a1b-5"\r\n'
    )
    assert all(line.endswith(b"\r\n") for line in resp.lines)  # (whole lines, each item)
    assert (resp.framing, resp.close) == (framing.LENGTH, False)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nETag: x\r\nContent-Length: 9\r\n\r\n",
        b"HTTP/1.1 502\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\n",  # read until the close
        b"HTTP/1.1 200 OK\r\nconnection:Close\r\nContent-Length: 1\r\n\r\nx",
        # Connection names headers to drop, in any case, beside the hop-by-hop ones
        b"HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nx-secret: s\r\nKeep-Alive: t=5\r\n"
        b"Set-Cookie: a=1\r\nX-SECRET: t\r\nSet-Cookie: b=2\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nConnection: TE, Trailer\r\nTE: trailers\r\nTrailer: X-T\r\n"
        b"Proxy-Thing: p\r\nUpgrade: h2c\r\nContent-Length: 1\r\n\r\nx",
        # what Connection may not drop: the message's framing
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nTest: 1\r\nTea: 2\r\nX-Connection: 3\r\nContent-Length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\nProxy-A: 1\r\n\r\n",
    ],
)
def test_heads_decide_as_line_by_line(head: bytes) -> None:
    assert_same(head)


_NAMES = st.sampled_from(
    [
        b"Connection",
        b"connection",
        b"Keep-Alive",
        b"TE",
        b"Trailer",
        b"Upgrade",
        b"Proxy-Authenticate",
        b"X-Drop",
        b"x-keep",
        b"Content-Type",
        b"Set-Cookie",
        b"Date",
    ]
)
_VALUES = st.sampled_from([b"close", b"keep-alive", b"x-drop", b"X-Drop, close", b"1", b""])


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=12), st.booleans())
def test_any_head_decides_as_line_by_line(headers: list[tuple[bytes, bytes]], sized: bool) -> None:
    lines = b"".join(b"%s: %s\r\n" % h for h in headers)
    if sized:
        lines += b"Content-Length: 0\r\n"
    assert_same(b"HTTP/1.1 200 OK\r\n" + lines + b"\r\n")


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n",  # not all there
        b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # trailers may follow
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"A: 1\r\n" * (http1.MAX_HEADERS + 1) + b"\r\n",
        b"HTTP/1.1 200 OK\r\nA: " + b"a" * http1.MAX_HEAD_BYTES + b"\r\n\r\n",
    ],
)
def test_what_is_read_line_by_line(data: bytes) -> None:
    assert whole(data) is None


def test_retry_after_is_found_in_a_head_read_whole() -> None:
    resp = whole(
        b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nretry-after:  7 \r\nConnection: close\r\n\r\n"
    )
    assert resp is not None
    assert http1.retry_after(resp) == 7.0


def test_a_head_made_once_takes_each_response_anew() -> None:
    resp = http1.ResponseHead(0, b"")
    closing = b"HTTP/1.1 503 Busy\r\nConnection: close\r\nX-A: 1\r\n\r\n"
    assert whole_response_head(closing, resp)
    assert (resp.status, resp.close, resp.sized, resp.framing) == (
        503,
        True,
        False,
        framing.UNTIL_CLOSE,
    )
    assert whole_response_head(NGINX, resp)
    assert (resp.status, resp.reason, resp.close, resp.sized) == (200, b"OK", False, True)
    assert forwarded(resp) == forwarded(LineByLine(NGINX).head())


def test_a_head_read_whole_goes_to_an_http2_client_as_read_line_by_line() -> None:
    resp = whole(NGINX)
    assert resp is not None
    assert http2.response_headers(resp) == http2.response_headers(LineByLine(NGINX).head())
    assert (b"etag", b'"6a1b-5"') in http2.response_headers(resp)
