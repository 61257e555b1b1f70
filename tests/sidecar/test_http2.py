"""What ``http2`` hands the codec for a client: made ready by it, since the downstream codec
neither normalises nor validates what it sends (``h2conn``); and what it takes from one,
checked by it (``Malformed``), since neither codec validates what it receives."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httptools
import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import RequestReceived, ResponseReceived, TrailersReceived
from h2.exceptions import ProtocolError
from hpack import NeverIndexedHeaderTuple
from hyperframe.frame import DataFrame

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


def test_a_head_from_http2_sends_on_the_fields_its_lines_would_make() -> None:
    """A head that came over HTTP/2 keeps its fields as they go on (no line split again):
    the same fields, never-indexed ones too, as its lines make; none once a line went."""
    resp = http2.H2ResponseHead(200)
    for name, value in [
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"trailer", b"grpc-status"),
        (b"proxy-thing", b"1"),
        (b"x-request-id", b"0123"),
        (b"content-length", b"5"),
    ]:
        resp.forward(name, value)
    resp.complete()
    made = http2.response_headers(resp)
    assert made is resp.fields
    from_lines = http2.response_headers(response(*resp.lines))
    assert (
        made
        == from_lines
        == [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"x-request-id", b"0123"),
            (b"content-length", b"5"),
        ]
    )
    never = [isinstance(f, NeverIndexedHeaderTuple) for f in made]
    assert never == [isinstance(f, NeverIndexedHeaderTuple) for f in from_lines]
    assert never == [False, False, True, False]
    resp.lines.pop()
    assert http2.response_headers(resp) == from_lines[:-1]


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


REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/")]
MALFORMED = [
    [*REQUEST, (b"X-Upper", b"1")],
    [*REQUEST, (b"x y", b"1")],
    [*REQUEST, (b"x:y", b"1")],
    [*REQUEST, (b"", b"1")],
    [*REQUEST, (b"x", b"a\r\nb: c")],
    [*REQUEST, (b"x", b"a\0")],
    [*REQUEST, (b"x", b" a")],
    [*REQUEST, (b"x", b"a\t")],
    [*REQUEST, (b"connection", b"close")],
    [*REQUEST, (b"transfer-encoding", b"chunked")],
    [*REQUEST, (b"te", b"gzip")],
    [*REQUEST, (b"host", b"other")],  # (its :authority says svc)
    [*REQUEST, (b"host", b"svc"), (b"host", b"svc")],
    [*REQUEST, (b":path", b"/again")],
    [
        (b":method", b"GET"),
        (b"x", b"1"),
        (b":scheme", b"http"),
        (b":path", b"/"),
        (b"host", b"svc"),
    ],
    [*REQUEST, (b":status", b"200")],
    [*REQUEST, (b":protocol", b"websocket")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")],  # no authority nor host
    [(b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"/")],
    [(b":method", b"GET"), (b":authority", b"svc"), (b":path", b"/")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc"), (b":path", b"")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"svc\r\n"), (b":path", b"/")],
]


@pytest.mark.parametrize("headers", MALFORMED)
def test_a_malformed_request_is_refused_as_the_codec_would(headers: http1.Headers) -> None:
    """What RFC 9113 (8.2, 8.3.1) calls malformed: ``http2.Malformed``, as h2's own check
    (turned off in ``server_config``) raises ProtocolError for it."""
    with pytest.raises(http2.Malformed):
        http2.request_head(headers, True)
    checking = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    client = H2Connection(
        H2Configuration(client_side=True, validate_outbound_headers=False,
                        normalize_outbound_headers=False, header_encoding=None)
    )  # fmt: skip
    checking.initiate_connection()
    client.initiate_connection()
    client.send_headers(1, headers, end_stream=True)
    with pytest.raises(ProtocolError):
        checking.receive_data(client.data_to_send())


def test_what_the_codec_takes_is_taken() -> None:
    """A host equal to the :authority, ``te: trailers`` in any case, an empty value, a
    value of any byte but NUL, CR and LF; a host without :authority."""
    head = http2.request_head(
        [*REQUEST, (b"host", b"svc"), (b"te", b"Trailers"), (b"x", b""), (b"y", b"\xff a")], True
    )
    assert (head.method, head.target, head.authority) == (b"GET", b"/", b"svc")
    only_host = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"h")]
    assert http2.request_head(only_host, True).authority == b"h"


def test_trailers_take_no_pseudo_header_nor_a_malformed_field() -> None:
    http2.check_trailers([(b"grpc-status", b"0"), (b"x", b"")])
    for trailers in ([(b":status", b"200")], [(b"Grpc-Status", b"0")], [(b"x", b"a\n")]):
        with pytest.raises(http2.Malformed):
            http2.check_trailers(trailers)


def test_values_new_each_request_are_not_indexed() -> None:
    """``x-request-id`` and the deadlines left are new each request: indexed, they would only
    push the others out of the HPACK table."""
    out: http1.Headers = []
    for name in (b"x-request-id", b"grpc-timeout", b"x-meshlet-deadline-ms", b"x-other"):
        http2.add_field(out, name, b"1")
    assert [isinstance(f, NeverIndexedHeaderTuple) for f in out] == [True, True, True, False]


def test_the_codec_logs_no_field_at_debug(caplog: pytest.LogCaptureFixture) -> None:
    """Under ``--log-level debug`` the sidecar's log holds no field the codec coded (hpack
    logs each one, an ``authorization`` value too), and hpack's debug calls cost nothing
    but the call."""
    caplog.set_level(logging.DEBUG)
    server = H2Connection(server_config())
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server.initiate_connection()
    client.initiate_connection()
    client.send_headers(1, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                            (b":authority", b"x"), (b"authorization", b"Bearer s3cret")],
                        end_stream=True)  # fmt: skip
    events = server.receive_data(client.data_to_send())
    assert any(isinstance(e, RequestReceived) for e in events)
    assert "s3cret" not in caplog.text
    assert not [r for r in caplog.records if r.name.startswith("hpack")]
    assert not logging.getLogger("hpack.hpack").isEnabledFor(logging.DEBUG)


def test_a_frame_received_is_not_formatted_for_the_codecs_trace() -> None:
    """The codec makes the ``repr`` of each frame it receives for a trace log that writes
    nothing: it is ``object``'s, no flag nor a byte of the body formatted (a secret in a
    body stays out of it too)."""
    frame = DataFrame(1, b"Bearer s3cret", flags=("END_STREAM",))
    assert repr(frame) == object.__repr__(frame)
    assert "s3cret" not in repr(frame)
    assert "END_STREAM" not in repr(frame)


class _ReadBack:
    """A request's HTTP/1.1 bytes read back into HTTP/2 fields, as ``h2upstream`` once sent
    an HTTP/2 upstream every request (through httptools): what ``upstream_headers`` must
    make without that detour."""

    def __init__(self, data: bytes) -> None:
        self.url = self.authority = b""
        self.fields: http1.Headers = []
        parser = httptools.HttpRequestParser(self)
        parser.feed_data(data)
        self.method = parser.get_method()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower == b"host":
            self.authority = value
        elif lower not in http2.NOT_SENT | {b"host"}:
            http2.add_field(self.fields, lower, value.strip())

    def headers(self) -> http1.Headers:
        pseudo = [(b":method", self.method), (b":scheme", b"http"),
                  (b":authority", self.authority), (b":path", self.url)]  # fmt: skip
        return [*pseudo, (b"te", b"trailers"), *self.fields]


def _from_http1() -> http1.RequestHead:
    return http1.parse_request_head(b"POST", b"/p?q=1", "1.1", [
        (b"Host", b"svc:80"), (b"Content-Type", b"text/plain"), (b"X-Forwarded-For", b" 10.0.0.1"),
        (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"), (b"Authorization", b"Basic eA=="),
        (b"Cookie", b"a=1"), (b"grpc-timeout", b"soon"), (b"Transfer-Encoding", b"chunked"),
        (b"TE", b"trailers"), (b"Proxy-Thing", b"1"), (b"x-meshlet-deadline-ms", b"900"),
        (b"X-Custom", b"  spaced  "),
    ], keep_alive=True)  # fmt: skip


def _from_http2() -> http1.RequestHead:
    head = http2.request_head([
        (b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"greeter"),
        (b":path", b"/pkg.Greeter/Hello"), (b"content-type", b"application/grpc"),
        (b"te", b"trailers"), (b"grpc-timeout", b"5S"), (b"cookie", b"a=1"),
        (b"cookie", b"b=2"), (b"x-request-id", b"given"), (b"user-agent", b"grpc-python"),
    ], ended=False)  # fmt: skip
    head.lines.append(b"x-meshlet-peer: spiffe://mesh/caller\r\n")  # (``h2conn``'s peer line)
    return head


def _from_http2_with_host() -> http1.RequestHead:
    return http2.request_head([
        (b":method", b"PUT"), (b":scheme", b"http"), (b":path", b"/x"), (b"host", b"svc"),
        (b"content-length", b"3"), (b"grpc-timeout", b"never"), (b"x-forwarded-for", b"1.1.1.1"),
        (b"authorization", b"Bearer t"), (b"expect", b"100-continue"),
    ], ended=False)  # fmt: skip


def _absolute_form() -> http1.RequestHead:
    return http1.parse_request_head(b"GET", b"http://svc/x", "1.1", [(b"Accept", b"*/*")], True)


@pytest.mark.parametrize("make", [_from_http1, _from_http2, _from_http2_with_host, _absolute_form])
@pytest.mark.parametrize("numbers", [(0, None, None), (2, 700, 650), (9, 0, None)])
def test_an_http2_upstream_gets_the_fields_an_http1_upstream_gets_in_its_head(
    make: Callable[[], http1.RequestHead], numbers: tuple[int, int | None, int | None]
) -> None:
    """Every rewrite the HTTP/1.1 head gets (hop-by-hop and ``Connection``-listed headers
    gone, ``x-forwarded-*``, ``x-request-id``, the try and the time left, the peer's line),
    and the same fields never indexed, as the HTTP/1.1 bytes read back made them."""
    head = make()
    via_http1 = _ReadBack(http1.upstream_request(head, b"10.0.0.9", *numbers)).headers()
    made = http2.upstream_headers(head, b"10.0.0.9", *numbers)  # (its x-request-id kept)
    assert made == via_http1
    never = [isinstance(f, NeverIndexedHeaderTuple) for f in made]
    assert never == [isinstance(f, NeverIndexedHeaderTuple) for f in via_http1]
    assert any(never)


def test_request_trailers_for_an_http2_upstream() -> None:
    out: http1.Headers = []
    for name, value in [(b"X-Checksum", b" 42 "), (b"Transfer-Encoding", b"x"), (b"host", b"h")]:
        http2.upstream_trailer(out, name, value)
    assert out == [(b"x-checksum", b"42")]
