"""Head rewriting as plain functions."""

from __future__ import annotations

import pytest

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
