"""gRPC's status codes as the proxy reads and writes them (``sidecar.http.grpc``)."""

from __future__ import annotations

import pytest

from sidecar.errors import Reason
from sidecar.http import grpc, http2


@pytest.mark.parametrize(
    ("reason", "code"),
    [
        (Reason.NO_HEALTHY_UPSTREAM, 14),  # 503 UNAVAILABLE
        (Reason.OVERLOADED, 14),
        (Reason.DRAINING, 14),
        (Reason.UPSTREAM_CONNECT_FAILURE, 14),  # 502
        (Reason.UPSTREAM_RESET, 14),
        (Reason.OUTSIDE_MESH, 14),
        (Reason.UPSTREAM_TIMEOUT, 4),  # 504 DEADLINE_EXCEEDED
        (Reason.REQUEST_TIMEOUT, 4),  # 408
        (Reason.FORBIDDEN, 7),  # 403 PERMISSION_DENIED
        (Reason.NO_ROUTE, 12),  # 404 UNIMPLEMENTED
        (Reason.BAD_REQUEST, 13),  # 400 INTERNAL
        (Reason.BODY_TOO_LARGE, 8),  # 413 RESOURCE_EXHAUSTED
        (Reason.HEAD_TOO_LARGE, 8),
    ],
)
def test_the_sidecars_answers_as_grpc_codes(reason: Reason, code: int) -> None:
    assert grpc.code_of(reason.status) == code


def test_a_status_without_a_mapping_is_unknown_and_429_is_resource_exhausted() -> None:
    assert grpc.code_of(418) == grpc.UNKNOWN
    assert grpc.code_of(429) == grpc.RESOURCE_EXHAUSTED


def test_seventeen_names_then_other() -> None:
    assert len(grpc.NAMES) == 17
    assert (grpc.name(0), grpc.name(14), grpc.name(16)) == ("ok", "unavailable", "unauthenticated")
    assert grpc.name(17) == grpc.name(-1) == "other"


@pytest.mark.parametrize(
    ("value", "code"),
    [(b"14", 14), (b" 0 ", 0), (b"", 2), (b"x", 2), (b"-1", 2), (b"9" * 20, 2)],
)
def test_a_malformed_grpc_status_is_unknown(value: bytes, code: int) -> None:
    assert grpc.parse_status(value) == code


def test_grpc_message_is_percent_encoded() -> None:
    """Printable ASCII but '%' as it is; the rest as UTF-8 bytes, %XX each (a client's
    string in the sidecar's detail cannot break the header)."""
    assert grpc.encode_message("no route to 'x'") == b"no route to 'x'"
    assert grpc.encode_message("50% \u00e9\r\n") == b"50%25 %C3%A9%0D%0A"
    assert len(grpc.encode_message("x" * 5000)) == 1024


@pytest.mark.parametrize(
    ("content_type", "is_grpc"),
    [
        (b"application/grpc", True),
        (b"application/grpc+proto", True),
        (b"Application/GRPC+json", True),
        (b"application/grpc;charset=utf-8", True),
        (b"application/grpc-web", False),
        (b"application/json", False),
        (b"", False),
    ],
)
def test_which_requests_are_grpc_calls(content_type: bytes, is_grpc: bool) -> None:
    assert grpc.is_grpc(content_type) == is_grpc
    headers = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/s/m"),
        (b":authority", b"svc"),
    ]
    head = http2.request_head([*headers, (b"content-type", content_type)], False)
    assert head.grpc == is_grpc


def test_a_trailers_only_answer() -> None:
    headers = grpc.trailers_only(14, "service x has no endpoints", "no-healthy-upstream")
    assert headers == [
        (b":status", b"200"),
        (b"content-type", b"application/grpc"),
        (b"grpc-status", b"14"),
        (b"grpc-message", b"service x has no endpoints"),
        (b"x-meshlet-error", b"no-healthy-upstream"),
    ]
