"""``grpc-timeout`` values read and written (gRPC's PROTOCOL-HTTP2.md, Envoy's rounding)."""

from __future__ import annotations

import pytest

from sidecar.http import http1
from sidecar.http.grpctimeout import format_ms, parse_ms


@pytest.mark.parametrize(
    ("value", "ms"),
    [
        (b"1H", 3_600_000),
        (b"2M", 120_000),
        (b"5S", 5_000),
        (b"300m", 300),
        (b"0m", 0),
        (b"1500u", 2),  # rounded up
        (b"1000u", 1),
        (b"1n", 1),
        (b"99999999m", 99_999_999),
        (b"000000007S", None),  # 9 digits
        (b"123456789m", None),
        (b"300", None),
        (b"m", None),
        (b"", None),
        (b"10x", None),
        (b"-5m", None),
        (b"1.5S", None),
        (b" 5S", None),
        (b"\xd9\xa3S", None),  # a digit, but not ASCII
    ],
)
def test_parse(value: bytes, ms: int | None) -> None:
    assert parse_ms(value) == ms


def test_format_keeps_eight_digits_and_never_lengthens() -> None:
    assert format_ms(0) == b"0m"
    assert format_ms(-3) == b"0m"
    assert format_ms(299) == b"299m"
    assert format_ms(99_999_999) == b"99999999m"
    assert format_ms(100_000_000) == b"100000S"
    assert format_ms(100_000_999) == b"100000S"
    assert parse_ms(format_ms(12_345_678_901)) == 12_345_678_000
    assert format_ms(123_456_789_012) == b"34293H"  # (past 8 digits of seconds)
    huge = format_ms(10**18)
    assert huge.endswith(b"H")
    assert len(huge) == 9


def test_a_request_head_reads_it_and_keeps_it_off_its_lines() -> None:
    head = http1.parse_request_head(
        b"POST", b"/x", "1.1", [(b"Grpc-Timeout", b"2S"), (b"grpc-timeout", b"700m")], True
    )
    assert head.grpc_timeout_ms == 700  # (two: the sooner)
    assert not any(b"grpc-timeout" in line.lower() for line in head.lines)
    sent = http1.upstream_request(head, b"10.0.0.1", 1, 650, 640)
    assert b"grpc-timeout: 640m\r\n" in sent
    bad = http1.parse_request_head(b"POST", b"/x", "1.1", [(b"grpc-timeout", b"soon")], True)
    assert bad.grpc_timeout_ms is None
    assert b"grpc-timeout: soon\r\n" in http1.upstream_request(bad, b"10.0.0.1")
