"""The HTTP/2 frame watch on its own: frame headers across reads, the one-second windows, the
header block's size (no sockets, time given)."""

from __future__ import annotations

import pytest
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, RstStreamFrame

from sidecar.proxy.h2guard import PREFACE, FrameWatch, H2Limits


def rst(sid: int) -> bytes:
    return RstStreamFrame(sid).serialize()


def headers(sid: int, size: int, *, end: bool) -> bytes:
    f = HeadersFrame(sid)
    f.data = b"\x00" * size
    if end:
        f.flags.add("END_HEADERS")
    return f.serialize()


def continuation(sid: int, size: int, *, end: bool) -> bytes:
    f = ContinuationFrame(sid)
    f.data = b"\x00" * size
    if end:
        f.flags.add("END_HEADERS")
    return f.serialize()


def test_resets_are_counted_per_second_and_frames_may_be_cut_anywhere() -> None:
    watch = FrameWatch(H2Limits(resets_per_s=10))
    data = PREFACE + b"".join(rst(2 * n + 1) for n in range(10))
    for i in range(len(data)):  # a byte at a time: the preface and headers cut everywhere
        assert watch.feed(data[i : i + 1], 0.0) is None
    assert watch.feed(rst(21), 0.5) == "rapid_reset"
    fresh = FrameWatch(H2Limits(resets_per_s=10))
    fresh.feed(PREFACE + b"".join(rst(2 * n + 1) for n in range(10)), 0.0)
    assert fresh.feed(rst(21), 1.0) is None  # a new second


def test_a_payload_is_skipped_not_read_as_frames() -> None:
    watch = FrameWatch(H2Limits(resets_per_s=1))
    # a HEADERS payload full of bytes that look like RST_STREAM frame headers
    fake = rst(1) * 100
    f = HeadersFrame(1)
    f.data = fake
    f.flags.add("END_HEADERS")
    assert watch.feed(PREFACE + f.serialize(), 0.0) is None


def test_a_header_block_is_measured_across_its_continuations() -> None:
    watch = FrameWatch(H2Limits(header_block_bytes=40_000))
    watch.feed(PREFACE, 0.0)
    assert watch.feed(headers(1, 16_000, end=False), 0.0) is None
    assert watch.feed(continuation(1, 16_000, end=False), 0.0) is None
    assert watch.feed(continuation(1, 16_000, end=False), 0.0) == "header_block"
    # blocks that end are measured one at a time
    other = FrameWatch(H2Limits(header_block_bytes=40_000))
    other.feed(PREFACE, 0.0)
    for sid in range(1, 20, 2):
        assert other.feed(headers(sid, 16_000, end=False), 0.0) is None
        assert other.feed(continuation(sid, 16_000, end=True), 0.0) is None


def test_ping_acks_are_not_counted() -> None:
    watch = FrameWatch(H2Limits(pings_per_s=2))
    ack = PingFrame(0)
    ack.flags.add("ACK")
    assert watch.feed(PREFACE + ack.serialize() * 10 + PingFrame(0).serialize() * 2, 0.0) is None
    assert watch.feed(PingFrame(0).serialize(), 0.0) == "ping_flood"


def test_limits_name_the_field() -> None:
    with pytest.raises(ValueError, match="resets_per_s"):
        H2Limits(resets_per_s=0)
