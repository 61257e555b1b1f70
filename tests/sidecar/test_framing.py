"""Where a body ends, decided in one function per message kind (h11's ``_body_framing``)."""

from __future__ import annotations

import httptools
import pytest

from sidecar.http import http1
from sidecar.http.framing import Framing, relayed_framing, request_framing, response_framing


def response(status: int, *headers: tuple[bytes, bytes], head: bool = False) -> Framing:
    resp = http1.parse_response_head(status, b"", list(headers))
    framing = response_framing(
        status,
        head_request=head,
        coded=resp.chunked or bool(resp.codings),
        chunked=resp.chunked,
        sized=resp.sized,
    )
    assert head or resp.framing is framing  # (a parsed head carries its framing)
    return framing


CL = (b"Content-Length", b"5")
CHUNKED = (b"Transfer-Encoding", b"chunked")
GZIP = (b"Transfer-Encoding", b"gzip")
GZIP_CHUNKED = (b"Transfer-Encoding", b"gzip, chunked")


@pytest.mark.parametrize("status", [100, 101, 204, 304])
def test_step_1_some_responses_never_have_a_body(status: int) -> None:
    assert response(status, CL) is Framing.EMPTY
    assert response(status, CHUNKED) is Framing.EMPTY


def test_step_1_the_answer_to_a_head_request_has_no_body() -> None:
    assert response(200, CL, head=True) is Framing.EMPTY
    assert response(200, CHUNKED, head=True) is Framing.EMPTY


def test_step_2_transfer_encoding_beats_content_length() -> None:
    assert response(200, CHUNKED) is Framing.CHUNKED
    assert response(200, GZIP_CHUNKED) is Framing.CHUNKED
    assert response(200, GZIP) is Framing.UNTIL_CLOSE  # not chunked last: the close ends it
    assert response_framing(200, head_request=False, coded=True, chunked=True, sized=True) is (
        Framing.CHUNKED
    )


def test_step_3_and_4_content_length_else_until_close() -> None:
    assert response(200, CL) is Framing.LENGTH
    assert response(200) is Framing.UNTIL_CLOSE
    assert response(500, (b"Content-Length", b"0")) is Framing.LENGTH


def request(*headers: tuple[bytes, bytes]) -> bool:
    return http1.parse_request_head(
        b"POST", b"/", "1.1", [(b"Host", b"a"), *headers], True
    ).has_body


def test_requests() -> None:
    assert [request(CHUNKED), request(CL), request(), request((b"Content-Length", b"0"))] == [
        True,
        True,
        False,
        False,
    ]
    assert request_framing(chunked=True, content_length=-1) is Framing.CHUNKED
    assert request_framing(chunked=False, content_length=10) is Framing.LENGTH
    assert request_framing(chunked=False, content_length=0) is Framing.EMPTY
    assert request_framing(chunked=False, content_length=-1) is Framing.EMPTY


@pytest.mark.parametrize(
    ("upstream", "http11", "http10"),
    [
        (Framing.EMPTY, Framing.EMPTY, Framing.EMPTY),
        (Framing.LENGTH, Framing.LENGTH, Framing.LENGTH),
        (Framing.CHUNKED, Framing.CHUNKED, Framing.UNTIL_CLOSE),
        (Framing.UNTIL_CLOSE, Framing.CHUNKED, Framing.UNTIL_CLOSE),
    ],
)
def test_a_relayed_response_is_rechunked_for_http11_and_closed_for_http10(
    upstream: Framing, http11: Framing, http10: Framing
) -> None:
    assert relayed_framing(upstream, "1.1") is http11
    assert relayed_framing(upstream, "1.0") is http10


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabc",
    ],
)
def test_what_the_parser_refuses_never_reaches_the_framing(raw: bytes) -> None:
    """The framing functions answer only for messages llhttp let through: a response with
    both a Transfer-Encoding and a Content-Length (or two lengths) is a protocol error."""
    with pytest.raises(httptools.HttpParserError):
        httptools.HttpResponseParser(object()).feed_data(raw)
