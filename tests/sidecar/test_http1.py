"""Head rewriting as plain functions."""

from __future__ import annotations

import httptools
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http import http1


def parse(
    url: bytes, headers: list[tuple[bytes, bytes]], method: bytes = b"GET"
) -> http1.RequestHead:
    return http1.parse_request_head(method, url, "1.1", headers, True)


@pytest.mark.parametrize(
    ("url", "target", "authority"),
    [
        (b"/a?b=1", b"/a?b=1", None),
        (b"http://svc/a?b", b"/a?b", b"svc"),
        (b"http://svc:80", b"/", b"svc:80"),
        (b"HTTP://svc?x=1", b"/?x=1", b"svc"),
    ],
)
def test_targets(url: bytes, target: bytes, authority: bytes | None) -> None:
    assert http1.split_target(b"GET", url) == (target, authority)


@pytest.mark.parametrize("url", [b"https://svc/", b"svc/a", b"http:///a", b"http://u@svc/", b"*"])
def test_unusable_targets(url: bytes) -> None:
    with pytest.raises(ValueError, match="target"):
        http1.split_target(b"GET", url)


def test_options_star_is_fine() -> None:
    assert http1.split_target(b"OPTIONS", b"*") == (b"*", None)


def test_upstream_request_rewrites_what_a_proxy_must() -> None:
    head = parse(
        b"http://svc/x",
        [
            (b"Host", b"other"),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"X-Hop", b"1"),
            (b"Proxy-Connection", b"keep-alive"),
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"X-Forwarded-For", b"2.2.2.2"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X-Keep", b"yes"),
        ],
        method=b"POST",
    )
    out = http1.upstream_request(head, b"127.0.0.9")
    assert out.startswith(b"POST /x HTTP/1.1\r\nHost: svc\r\nX-Keep: yes\r\n")
    assert b"x-forwarded-for: 1.1.1.1, 2.2.2.2, 127.0.0.9\r\n" in out
    assert b"transfer-encoding: chunked\r\n" in out
    assert b"X-Hop" not in out
    assert b"Proxy-Connection" not in out
    assert out.count(b"x-request-id: ") == 1
    assert out.endswith(b"\r\n\r\n")


def test_upgrade_keeps_upgrade_headers() -> None:
    head = parse(b"/ws", [(b"Host", b"s"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")])
    assert head.upgrade
    out = http1.upstream_request(head, b"1.2.3.4")
    assert b"connection: upgrade\r\nupgrade: websocket\r\n" in out
    plain = parse(b"/", [(b"Host", b"s"), (b"Upgrade", b"h2c")])
    assert not plain.upgrade
    assert b"h2c" not in http1.upstream_request(plain, b"1.2.3.4")


def test_every_try_sends_the_request_id_the_sidecar_gave_it() -> None:
    """A request that came without an ``x-request-id`` keeps the one it was given on its
    first try: a retry sends it again (it sent none)."""
    head = parse(b"/", [(b"Host", b"svc")])
    tries = [http1.upstream_request(head, b"1.2.3.4", attempt) for attempt in (1, 2)]
    assert [t.count(b"x-request-id: " + head.request_id + b"\r\n") for t in tries] == [1, 1]
    assert len(head.request_id) == 36


def test_request_ids_are_unique_and_uuid_shaped() -> None:
    ids = {http1.new_request_id() for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 36 and i.count(b"-") == 4 for i in ids)


def test_response_head_classification() -> None:
    resp = http1.parse_response_head(
        200,
        b"OK",
        [
            (b"Content-Length", b"5"),
            (b"Connection", b"close, X-Secret"),
            (b"X-Secret", b"s"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ],
    )
    assert (resp.sized, resp.chunked, resp.close) == (True, False, True)
    out = http1.downstream_response(resp, chunked=False, keep_alive=True, client_version="1.1")
    assert (
        out == b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
    )
    out = http1.downstream_response(resp, chunked=True, keep_alive=False, client_version="1.0")
    assert out.endswith(b"transfer-encoding: chunked\r\nconnection: close\r\n\r\n")


def test_framing_helpers() -> None:
    assert http1.chunk(b"hello") == b"5\r\nhello\r\n"
    assert http1.last_chunk([]) == b"0\r\n\r\n"
    assert http1.last_chunk([(b"X-T", b"1")]) == b"0\r\nX-T: 1\r\n\r\n"
    assert http1.reason_phrase(404, b"") == b"Not Found"
    assert http1.reason_phrase(599, b"") == b"Unknown"


def test_two_host_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="more than one Host"):
        parse(b"/", [(b"Host", b"a"), (b"host", b"b")])
    with pytest.raises(ValueError, match="more than one Host"):
        parse(b"http://a/", [(b"Host", b"a"), (b"Host", b"a")])


@pytest.mark.parametrize(
    ("headers", "read"),
    [
        (
            [(b"x-meshlet-attempt", b"2"), (b"X-Meshlet-Deadline-Ms", b" 1500 ")],
            (1500, None, 2, False),
        ),
        ([(b"x-meshlet-timeout-ms", b"0"), (b"x-meshlet-retry", b"ON")], (None, None, 0, True)),
        (
            [(b"x-meshlet-timeout-ms", b"250"), (b"x-meshlet-deadline-ms", b"1e3")],
            (None, 250, 0, False),
        ),
        # malformed numbers are ignored (too long, signed), as Envoy ignores its own
        (
            [(b"x-meshlet-deadline-ms", b"12345678901"), (b"x-meshlet-attempt", b"-1")],
            (None, None, 0, False),
        ),
        # a later line wins
        ([(b"x-meshlet-attempt", b"1"), (b"x-meshlet-attempt", b"3")], (None, None, 3, False)),
    ],
)
def test_the_mesh_headers_are_read_and_never_forwarded_as_sent(
    headers: list[tuple[bytes, bytes]], read: tuple[object, ...]
) -> None:
    head = parse(b"/", [(b"Host", b"svc"), *headers, (b"X-Keep", b"1")])
    assert (head.deadline_ms, head.timeout_ms, head.attempt, head.retry) == read
    assert head.lines == [b"Host: svc\r\n", b"X-Keep: 1\r\n"]
    assert (head.unlisted, head.unlisted_bytes) == (
        len(headers),
        sum(len(n) + len(v) + 4 for n, v in headers),
    )


def test_forwarding_and_dropped_headers_are_counted_for_the_limits() -> None:
    head = parse(
        b"/",
        [
            (b"X-Forwarded-For", b"1.1.1.1"),
            (b"x-forwarded-proto", b"https"),
            (b"Keep-Alive", b"5"),
            (b"x-forwarded-for", b"2.2.2.2"),
            (b"Host", b"svc"),
        ],
    )
    assert head.forwarded_for == b"1.1.1.1, 2.2.2.2"
    assert head.lines == [b"Host: svc\r\n"]
    assert head.unlisted == 4


# -- the mesh's lines read whole (``cut_mesh_tail``) -------------------------------------------


class ParsedLines:
    """The first request head of a read as httptools delivers it: target and header lines."""

    def __init__(self, data: bytes) -> None:
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.method = b""
        self.parser = httptools.HttpRequestParser(self)
        self.parser.feed_data(data)

    def on_url(self, url: bytes) -> None:
        if not self.method:
            self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.method:
            self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.method = self.method or self.parser.get_method()


def read_head(data: bytes, *, cut: bool) -> tuple[http1.RequestHead, bool]:
    """The first head of ``data`` as the inbound listener reads it (``cut``: its mesh lines
    cut off and read whole when it ends with them), and whether they were."""
    found = http1.cut_mesh_tail(data) if cut else None
    tail = None
    if found is not None:
        data, tail = found
    parsed = ParsedLines(data)
    head = http1.request_head(parsed.method, parsed.url, "1.1")
    for name, value in parsed.headers:
        head.add(name, value)
    if tail is not None:
        head.mesh_tail(tail)
    head.complete(True)
    return head, tail is not None


#: what a request head says (compiled, its class has no ``__slots__`` to list them)
_FIELDS = (
    "method",
    "target",
    "version",
    "keep_alive",
    "authority",
    "proxied",
    "chunked",
    "upgrade",
    "expect_continue",
    "has_body",
    "content_length",
    "request_id",
    "codings",
    "forwarded_for",
    "upgrade_value",
    "deadline_ms",
    "timeout_ms",
    "attempt",
    "retry",
    "grpc_timeout_ms",
    "grpc",
    "lines",
    "unlisted",
    "unlisted_bytes",
)


def same_either_way(data: bytes) -> bool:
    """The head reads the same with its mesh lines cut off as line by line; whether they
    were cut off."""
    whole, cut = read_head(data, cut=True)
    by_line, _ = read_head(data, cut=False)
    assert {f: getattr(whole, f) for f in _FIELDS} == {f: getattr(by_line, f) for f in _FIELDS}
    return cut


_APP_LINES = st.sampled_from(
    [
        (b"Host", b"svc"),
        (b"host", b"svc:80"),
        (b"X-Forwarded-For", b"1.1.1.1"),
        (b"x-forwarded-for", b"2.2.2.2, 3.3.3.3"),
        (b"X-Request-Id", b"from-the-app"),
        (b"x-meshlet-attempt", b"5"),
        (b"x-meshlet-deadline-ms", b"70"),
        (b"x-meshlet-timeout-ms", b"80"),
        (b"Accept", b"*/*"),
        (b"Content-Length", b"0"),
    ]
)


@given(
    st.lists(_APP_LINES, max_size=6, unique_by=lambda line: line[0].lower()),
    st.integers(1, 10**10 - 1),  # (an outbound's tries count from 1)
    st.integers(0, 10**10 - 1),
    st.sampled_from([b"", b"GET /b HTTP/1.1\r\n", b"GET /b HTTP/1.1\r\nhost: b\r\n\r\n"]),
)
def test_the_mesh_lines_an_outbound_sends_read_whole_as_line_by_line(
    lines: list[tuple[bytes, bytes]], attempt: int, deadline: int, after: bytes
) -> None:
    app = http1.request_head(b"GET", b"/a", "1.1")
    for name, value in lines:
        app.add(name, value)
    app.complete(True)
    sent = http1.upstream_request(app, b"127.0.0.1", attempt, deadline)
    sent += after  # (a request may follow, all there or not)
    assert same_either_way(sent)


def test_an_id_the_outbound_made_is_read_whole_with_the_mesh_lines() -> None:
    app = http1.request_head(b"GET", b"/a", "1.1")
    app.add(b"Host", b"svc")
    app.complete(True)
    found = http1.cut_mesh_tail(http1.upstream_request(app, b"127.0.0.1", 1, 900))
    assert found is not None
    rest, tail = found
    assert rest == b"GET /a HTTP/1.1\r\nHost: svc\r\n\r\n"  # (nothing left for the parser)
    assert tail[2] == app.request_id


@pytest.mark.parametrize(
    ("data", "cut"),
    [
        (
            b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1.2.3.4\r\nx-forwarded-proto: http"
            b"\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 900\r\n\r\n",
            True,
        ),
        # what differs in the least is read line by line
        (
            b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1.2.3.4 \r\nx-forwarded-proto: http"
            b"\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 900\r\n\r\n",
            False,
        ),
        (
            b"GET / HTTP/1.1\r\nhost: a\r\nX-Forwarded-For: 1.2.3.4\r\nx-forwarded-proto: http"
            b"\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 900\r\n\r\n",
            False,
        ),
        (
            b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1.2.3.4\r\nx-forwarded-proto: http"
            b"\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 12345678901\r\n\r\n",
            False,
        ),
        (
            b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1.2.3.4\r\nx-forwarded-proto: http"
            b"\r\ngrpc-timeout: 1S\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 9\r\n\r\n",
            False,
        ),
        (
            b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1.2.3.4\r\nx-forwarded-proto: http"
            b"\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 9\r\nx-more: 1\r\n\r\n",
            False,
        ),
        # only the first head's: a second one in the same read is read line by line
        (
            b"GET / HTTP/1.1\r\nhost: a\r\n\r\nGET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1"
            b"\r\nx-forwarded-proto: http\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 9"
            b"\r\n\r\n",
            False,
        ),
    ],
)
def test_only_the_mesh_lines_as_an_outbound_writes_them_are_read_whole(
    data: bytes, cut: bool
) -> None:
    assert same_either_way(data) is cut


def test_a_value_llhttp_refuses_is_left_to_it() -> None:
    data = (
        b"GET / HTTP/1.1\r\nhost: a\r\nx-forwarded-for: 1.2.\x013.4\r\nx-forwarded-proto: "
        b"http\r\nx-meshlet-attempt: 1\r\nx-meshlet-deadline-ms: 9\r\n\r\n"
    )
    assert http1.cut_mesh_tail(data) is None
    with pytest.raises(httptools.HttpParserError):
        ParsedLines(data)


def test_the_last_lines_kept_for_an_upstream_are_the_ones_made_and_bounded() -> None:
    """``upstream_request``'s ``ends``: a value seen before reuses its line; the same bytes
    go either way; the store never holds more than DEADLINE_ENDS"""
    head = http1.request_head(b"GET", b"/a", "1.1")
    head.add(b"Host", b"svc")
    head.complete(True)
    ends: dict[int, bytes] = {}
    first = http1.upstream_request(head, b"10.0.0.1", 1, 1500, None, ends)
    assert first == http1.upstream_request(head, b"10.0.0.1", 1, 1500)
    assert first.endswith(b"\r\nx-meshlet-deadline-ms: 1500\r\n\r\n")
    kept = ends[1500]
    again = http1.upstream_request(head, b"10.0.0.1", 1, 1500, None, ends)
    assert again == first
    assert ends[1500] is kept  # (made once)
    for ms in range(2 * http1.DEADLINE_ENDS):
        sent = http1.upstream_request(head, b"10.0.0.1", 1, ms, None, ends)
        assert sent.endswith(b"x-meshlet-deadline-ms: %d\r\n\r\n" % ms)
        assert len(ends) <= http1.DEADLINE_ENDS
    no_deadline = http1.upstream_request(head, b"10.0.0.1", 1, None, None, ends)
    assert no_deadline.endswith(b"x-meshlet-attempt: 1\r\n\r\n")


def test_http_date_writes_what_the_email_package_writes() -> None:
    """``http_date``: IMF-fixdate, as ``email.utils.formatdate(usegmt=True)`` (the admin
    port's Date header), for every weekday and month"""
    import email.utils  # (the reference)

    for when in [
        0.0,
        784111777.0,
        951782400.5,
        *(1_700_000_000 + 2_700_000 * i for i in range(14)),
    ]:
        assert http1.http_date(when) == email.utils.formatdate(when, usegmt=True).encode()
