"""What ``http2`` hands the codec for a client: made ready by it, since the downstream codec
neither normalises nor validates what it sends (``h2conn``)."""

from __future__ import annotations

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived, ResponseReceived, TrailersReceived
from hpack import NeverIndexedHeaderTuple

from sidecar.http import http1, http2
from sidecar.proxy.h2conn import server_config


def response(*lines: bytes) -> http1.ResponseHead:
    resp = http1.ResponseHead(200, b"OK")
    resp.lines = list(lines)
    return resp


def test_response_fields_lower_cased_stripped_and_the_forbidden_ones_left_out() -> None:
    resp = response(
        b"Content-Type:  text/plain \r\n",
        b"TE: gzip\r\nConnection: close\r\nKeep-Alive: 5\r\n",  # (a head read whole)
        b": no name\r\n",
        b"X-Trace: a\r\n",
    )
    assert http2.response_headers(resp) == [
        (b":status", b"200"),
        (b"content-type", b"text/plain"),
        (b"x-trace", b"a"),
    ]


def test_authorization_and_a_short_cookie_are_never_indexed() -> None:
    resp = response(b"Authorization: Basic eA==\r\n", b"Cookie: a=1\r\n", b"Set-Cookie: a=1\r\n")
    _, auth, cookie, set_cookie = http2.response_headers(resp)
    assert isinstance(auth, NeverIndexedHeaderTuple)
    assert isinstance(cookie, NeverIndexedHeaderTuple)
    assert not isinstance(set_cookie, NeverIndexedHeaderTuple)
    assert set_cookie == (b"set-cookie", b"a=1")


def test_trailer_fields() -> None:
    assert http2.trailer_field(b"Grpc-Status ", b" 0 ") == (b"grpc-status", b"0")
    for name in (b"te", b"Transfer-Encoding", b":status", b" "):
        assert http2.trailer_field(name, b"x") is None


def test_what_it_makes_is_valid_to_a_validating_client() -> None:
    """The sidecar's codec sends what ``http2`` made as it is; a client that validates what
    it receives (h2's defaults) takes the head and the trailers."""
    server = H2Connection(server_config())
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server.initiate_connection()
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                            (b":authority", b"x")], end_stream=True)  # fmt: skip
    server.receive_data(client.data_to_send())
    resp = response(b"Content-Type: a\r\nUpgrade: h2c\r\nAuthorization: x\r\n")
    server.send_headers(1, http2.response_headers(resp))
    trailer = http2.trailer_field(b"Grpc-Status", b"0")
    assert trailer is not None
    server.send_headers(1, [trailer], end_stream=True)
    events = client.receive_data(server.data_to_send())
    head = next(e for e in events if isinstance(e, ResponseReceived))
    trailers = next(e for e in events if isinstance(e, TrailersReceived))
    assert head.headers == [(b":status", b"200"), (b"content-type", b"a"),
                            (b"authorization", b"x")]  # fmt: skip
    assert trailers.headers == [(b"grpc-status", b"0")]


def test_split_cookies_from_a_client_are_joined_once() -> None:
    """The codec leaves them apart (``server_config``); ``request_head`` joins them."""
    server = H2Connection(server_config())
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server.initiate_connection()
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                            (b":authority", b"x"), (b"cookie", b"a=1"), (b"accept", b"*/*"),
                            (b"cookie", b"b=2")], end_stream=True)  # fmt: skip
    (request,) = [e for e in server.receive_data(client.data_to_send())
                  if isinstance(e, RequestReceived)]  # fmt: skip
    head = http2.request_head(request.headers, True)
    assert b"".join(head.lines).count(b"ookie") == 1
    assert b"ookie: a=1; b=2\r\n" in b"".join(head.lines)
