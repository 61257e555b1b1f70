"""The control-plane stream's WebSocket, without sockets: the handshake, frames both ways
(RFC 6455's own examples where it has them), fragments, control frames, the size limit, and
the keepalive's decisions."""

from __future__ import annotations

import pytest

from sidecar.control.httpclient import ResponseHead, Target, parse_head
from sidecar.control.websocket import (
    ClientConnection,
    Close,
    Message,
    Opcode,
    Ping,
    Pong,
    accept_for,
    check_answer,
    handshake_request,
    new_key,
)
from sidecar.control.wsclient import Due, Keepalive
from sidecar.errors import FrameError, HandshakeError, PeerError

RFC_KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 1.3
RFC_ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
MASK = bytes((0x37, 0xFA, 0x21, 0x3D))  # RFC 6455 5.7


def server_frame(opcode: int, payload: bytes, *, fin: bool = True) -> bytes:
    """A frame as a server sends it: unmasked."""
    n = len(payload)
    first = (0x80 if fin else 0) | opcode
    if n < 126:
        return bytes((first, n)) + payload
    if n < 1 << 16:
        return bytes((first, 126)) + n.to_bytes(2, "big") + payload
    return bytes((first, 127)) + n.to_bytes(8, "big") + payload


def unmask(frame: bytes) -> tuple[int, bytes]:
    """A client frame's first byte and payload; it must be masked."""
    assert frame[1] & 0x80, "a client frame is masked"
    n, at = frame[1] & 0x7F, 2
    if n == 126:
        n, at = int.from_bytes(frame[2:4], "big"), 4
    elif n == 127:
        n, at = int.from_bytes(frame[2:10], "big"), 10
    mask, data = frame[at : at + 4], frame[at + 4 :]
    assert len(data) == n
    return frame[0], bytes(b ^ mask[i % 4] for i, b in enumerate(data))


def events(ws: ClientConnection, data: bytes = b"") -> list[object]:
    ws.receive_data(data)
    out: list[object] = []
    while (event := ws.next_event()) is not None:
        out.append(event)
    return out


def conn(max_message: int = 1 << 20) -> ClientConnection:
    return ClientConnection(max_message, random=lambda n: MASK[:n] if n == 4 else bytes(n))


# -- the handshake ---------------------------------------------------------------------------


def test_the_accept_value_is_rfc_6455s() -> None:
    assert accept_for(RFC_KEY) == RFC_ACCEPT
    assert len(new_key()) == 24
    assert new_key() != new_key()


def test_the_upgrade_request() -> None:
    target = Target.of("wss://cp.example:7443/v1/stream")
    raw = handshake_request(target, RFC_KEY, {"Authorization": "Bearer t"}).decode()
    lines = raw.split("\r\n")
    assert lines[0] == "GET /v1/stream HTTP/1.1"
    assert raw.endswith("\r\n\r\n")
    assert {
        "Host: cp.example:7443",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {RFC_KEY}",
        "Sec-WebSocket-Version: 13",
        "Authorization: Bearer t",
    } <= set(lines)
    assert (target.host, target.port, target.secure) == ("cp.example", 7443, True)
    assert Target.of("ws://[::1]/x?y=1") == Target("::1", 80, "[::1]", "/x?y=1", False)


def answer(**headers: str) -> ResponseHead:
    """A 101 with the right headers, but ``headers``."""
    good = {"upgrade": "websocket", "connection": "Upgrade", "sec-websocket-accept": RFC_ACCEPT}
    return ResponseHead(101, "Switching Protocols", good | headers)


def test_a_proper_101_opens_the_stream() -> None:
    check_answer(answer(), RFC_KEY)
    check_answer(answer(connection="keep-alive, upgrade"), RFC_KEY)


@pytest.mark.parametrize(
    ("head", "status", "says"),
    [
        (ResponseHead(401, "Unauthorized", {}), 401, "HTTP 401 Unauthorized"),
        (ResponseHead(404, "", {}), 404, "HTTP 404"),
        (answer(**{"sec-websocket-accept": "x"}), 101, "Sec-WebSocket-Accept that does not"),
        (answer(upgrade="h2c"), 101, "no Upgrade: websocket"),
        (answer(connection="close"), 101, "no Connection: upgrade"),
        (answer(**{"sec-websocket-extensions": "permessage-deflate"}), 101, "not asked for"),
        (answer(**{"sec-websocket-protocol": "chat"}), 101, "subprotocol"),
    ],
)
def test_a_bad_answer_to_the_upgrade_is_refused(head: ResponseHead, status: int, says: str) -> None:
    with pytest.raises(HandshakeError, match=says) as raised:
        check_answer(head, RFC_KEY)
    assert raised.value.status == status


def test_a_response_head_is_parsed_and_repeated_headers_joined() -> None:
    head = parse_head(b"HTTP/1.1 200 OK\r\nX-A: 1\r\nx-a:  2 \r\nContent-Length: 0")
    assert head == ResponseHead(200, "OK", {"x-a": "1, 2", "content-length": "0"})
    with pytest.raises(PeerError, match=r"not an HTTP/1\.1 answer"):
        parse_head(b"SSH-2.0-OpenSSH_9.6")
    with pytest.raises(PeerError, match="malformed header"):
        parse_head(b"HTTP/1.1 200 OK\r\nno colon here")


# -- frames out ------------------------------------------------------------------------------


def test_client_frames_are_masked_as_in_rfc_6455() -> None:
    assert conn().text("Hello") == bytes.fromhex("818537fa213d7f9f4d5158")  # 5.7's example
    assert unmask(conn().ping(b"hi")) == (0x80 | Opcode.PING, b"hi")
    assert unmask(conn().pong(b"hi")) == (0x80 | Opcode.PONG, b"hi")


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 70000])
def test_every_length_encoding_round_trips(size: int) -> None:
    text = "x" * size
    first, payload = unmask(ClientConnection(1 << 20).text(text))
    assert (first, payload.decode()) == (0x80 | Opcode.TEXT, text)


def test_close_goes_once_with_its_code_and_reason_and_nothing_after_it() -> None:
    ws = conn()
    assert unmask(ws.close(4000, "bye")) == (0x80 | Opcode.CLOSE, b"\x0f\xa0bye")
    assert ws.close() == b""
    assert "closing" in repr(ws)
    with pytest.raises(AssertionError):
        ws.text("late")


# -- frames in -------------------------------------------------------------------------------


def test_a_text_message_arrives_whole_however_it_is_cut() -> None:
    frame = server_frame(Opcode.TEXT, "héllo".encode())
    ws = conn()
    for i in range(len(frame) - 1):
        assert events(ws, frame[i : i + 1]) == []
    assert events(ws, frame[-1:]) == [Message("héllo")]


@pytest.mark.parametrize("size", [126, 65536, 300_000])
def test_long_messages_and_binary(size: int) -> None:
    data = bytes(range(256)) * (size // 256) + b"z" * (size % 256)
    frame = server_frame(Opcode.BINARY, data)
    ws = conn()
    got = events(ws, frame[:1000]) + events(ws, frame[1000:])
    assert got == [Message(data)]


def test_fragments_are_joined_and_control_frames_between_them_come_first() -> None:
    ws = conn()
    got = events(
        ws,
        server_frame(Opcode.TEXT, b"Hel", fin=False)
        + server_frame(Opcode.PING, b"are you there")
        + server_frame(Opcode.CONTINUATION, b"l", fin=False)
        + server_frame(Opcode.PONG, b"")
        + server_frame(Opcode.CONTINUATION, b"o")
        + server_frame(Opcode.TEXT, b"next"),
    )
    assert got == [Ping(b"are you there"), Pong(b""), Message("Hello"), Message("next")]


def test_a_close_says_its_code_and_reason_and_ends_the_reading() -> None:
    ws = conn()
    close = server_frame(Opcode.CLOSE, b"\x11\x31token revoked")
    assert events(ws, close + server_frame(Opcode.TEXT, b"late")) == [Close(4401, "token revoked")]
    assert events(ws, server_frame(Opcode.TEXT, b"later")) == []
    assert unmask(ws.close(4401)) == (0x80 | Opcode.CLOSE, b"\x11\x31")  # the echo
    assert "closed" in repr(ws)
    assert events(conn(), server_frame(Opcode.CLOSE, b"")) == [Close(None, "")]


def test_a_message_over_the_limit_is_refused_from_its_header() -> None:
    ws = conn(max_message=100)
    header = server_frame(Opcode.TEXT, b"x" * 101)[:2]
    with pytest.raises(FrameError, match="101 bytes or more") as raised:
        events(ws, header)  # no payload has come yet
    assert raised.value.code == 1009
    assert events(conn(max_message=100), server_frame(Opcode.TEXT, b"x" * 100)) == [
        Message("x" * 100)
    ]


def test_fragments_over_the_limit_together_are_refused() -> None:
    ws = conn(max_message=100)
    assert events(ws, server_frame(Opcode.BINARY, b"x" * 60, fin=False)) == []
    with pytest.raises(FrameError) as raised:
        events(ws, server_frame(Opcode.CONTINUATION, b"x" * 60)[:2])
    assert raised.value.code == 1009


def test_a_huge_64_bit_length_is_refused_before_anything_is_allocated() -> None:
    with pytest.raises(FrameError) as raised:
        events(conn(), bytes((0x82, 127)) + (1 << 62).to_bytes(8, "big"))
    assert raised.value.code == 1009


@pytest.mark.parametrize(
    ("data", "code", "says"),
    [
        (bytes((0x81, 0x81)) + MASK + b"x", 1002, "masked frame from the server"),
        (bytes((0xC1, 0)), 1002, "RSV bits"),
        (bytes((0x83, 0)), 1002, "unknown opcode 3"),
        (server_frame(Opcode.CONTINUATION, b"x"), 1002, "continuation with no message"),
        (
            server_frame(Opcode.TEXT, b"a", fin=False) + server_frame(Opcode.TEXT, b"b"),
            1002,
            "a new message in the middle",
        ),
        (server_frame(Opcode.PING, b"", fin=False), 1002, "fragmented or long PING"),
        (server_frame(Opcode.PING, b"x" * 126), 1002, "fragmented or long PING"),
        (server_frame(Opcode.TEXT, b"\xff\xfe"), 1007, "not UTF-8"),
        (server_frame(Opcode.CLOSE, b"\x03"), 1002, "close frame"),
        (server_frame(Opcode.CLOSE, b"\x03\xed"), 1002, "close frame with code 1005"),
        (server_frame(Opcode.CLOSE, b"\x03\xe8\xff"), 1007, "close reason"),
    ],
)
def test_frames_rfc_6455_forbids_are_refused_with_their_close_code(
    data: bytes, code: int, says: str
) -> None:
    with pytest.raises(FrameError, match=says) as raised:
        events(conn(), data)
    assert raised.value.code == code


# -- keepalive -------------------------------------------------------------------------------


def test_keepalive_pings_a_quiet_server_and_gives_up_half_a_period_later() -> None:
    k = Keepalive(10.0, now=100.0)
    assert (k.wait(100.0), k.due(109.9)) == (10.0, None)
    assert k.due(110.0) is Due.PING
    assert (k.wait(112.0), k.due(114.9)) == (3.0, None)
    assert k.due(115.0) is Due.DEAD


def test_keepalive_anything_received_counts_as_alive() -> None:
    k = Keepalive(10.0, now=100.0)
    k.received(108.0)
    assert (k.due(117.9), k.wait(110.0)) == (None, 8.0)
    assert k.due(118.0) is Due.PING
    k.received(120.0)  # the pong (or any frame)
    assert k.due(125.0) is None
    assert k.due(130.0) is Due.PING
