"""gRPC calls classified by their grpc-status, in the exchange without a socket: a fake
client and fake upstream connections (``test_exchange``'s), on a fake clock. A trailers-only
answer is classified at its head (so it can be retried), one in the trailers after the
messages at the end (for the endpoint's statistics and the metrics only)."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.balancing.ewma import Phase
from sidecar.errors import Reason
from sidecar.http import http1
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.upstream import UpstreamConnection
from sidecar.resilience.tries import State
from tests.sidecar.test_exchange import Mesh, closed

GRPC = (b"content-type", b"application/grpc")


def call(mesh: Mesh) -> Exchange:
    """A unary gRPC call (a POST with its one message) as an HTTP/2 stream makes it."""
    head = http1.parse_request_head(
        b"POST", b"/pkg.Svc/Do", "2", [(b"host", b"svc"), GRPC, (b"content-length", b"5")], True
    )
    head.grpc = True  # (``http2.request_head``, for its content-type)
    ex = Exchange(mesh.client, head)
    ex.start()
    ex.request_body(b"\0\0\0\0\0")
    ex.request_complete()
    return ex


def trailers_only(ex: Exchange, code: int) -> None:
    """The upstream's trailers-only answer, as ``h2upstream`` hands it over."""
    resp = http1.parse_response_head(200, b"", [GRPC])
    resp.chunked = True
    resp.complete()
    resp.grpc_status = code
    ex.response_head(resp)
    if ex.state is State.RESPONDING:  # the answer (else its connection was let go)
        ex.response_trailer(b"grpc-status", b"%d" % code)
        ex.response_complete()


def streamed(conn: UpstreamConnection, code: int) -> None:
    """An answer with a message, then its status in the trailers."""
    conn.data_received(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
        b"\r\n5\r\n\0\0\0\0\0\r\n0\r\ngrpc-status: %d\r\n\r\n" % code
    )


def grpc_of(mesh: Mesh) -> list[Any]:
    """(status, grpc-status) of each request recorded."""
    return [(entry[2], entry[7]) for entry in mesh.client.records]


def test_a_trailers_only_unavailable_is_retried_on_the_other_endpoint() -> None:
    mesh = Mesh(retry_on=["unavailable"])
    ex = call(mesh)
    (first,) = mesh.conns()
    trailers_only(ex, 14)
    assert mesh.client.written == b""  # the failure goes nowhere
    assert (ex.state, closed(first)) == (State.BACKOFF, True)
    mesh.ring(ex)
    _, second = mesh.conns()
    assert first.pool is not second.pool
    assert second.transport is not None
    assert b"\0\0\0\0\0" in second.transport.sent  # type: ignore[attr-defined]  # replayed
    streamed(second, 0)
    assert mesh.status() == 200
    assert mesh.service.retry_reasons == {"unavailable": 1}
    assert [s.failures for s in mesh.stats] == [1, 0]
    assert grpc_of(mesh) == [(200, 0)]


def test_without_a_grpc_code_in_retry_on_the_failure_is_the_answer() -> None:
    """The default retry_on (statuses, resets) retries no gRPC call: a POST."""
    mesh = Mesh()
    ex = call(mesh)
    trailers_only(ex, 14)
    assert (mesh.status(), ex.state) == (200, State.DONE)
    assert mesh.service.retries == 0
    assert [s.failures for s in mesh.stats] == [1, 0]
    assert grpc_of(mesh) == [(200, 14)]


@pytest.mark.parametrize(("code", "failed"), [(0, 0), (5, 0), (8, 0), (13, 1), (14, 1), (4, 1)])
def test_a_status_in_the_trailers_is_counted_at_the_end(code: int, failed: int) -> None:
    mesh = Mesh()
    call(mesh)
    streamed(mesh.conns()[0], code)
    assert mesh.status() == 200
    assert (mesh.stats[0].tries, mesh.stats[0].failures) == (1, failed)
    assert grpc_of(mesh) == [(200, code)]


def test_a_call_status_in_the_trailers_keeps_the_heads_latency() -> None:
    """The endpoint's latency is its time to the head, not to the end of a long stream."""
    mesh = Mesh()
    call(mesh)
    (conn,) = mesh.conns()
    mesh.clock.advance(0.050)
    conn.data_received(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
        b"\r\n5\r\n\0\0\0\0\0\r\n"
    )
    assert mesh.stats[0].tries == 0  # not recorded before its status
    mesh.clock.advance(10.0)
    conn.data_received(b"0\r\ngrpc-status: 14\r\n\r\n")
    assert (mesh.stats[0].tries, mesh.stats[0].failures) == (1, 1)
    rtt = mesh.stats[0].statistics(mesh.clock.now).rtt_ms
    penalty = mesh.stats[0].statistics(mesh.clock.now).penalty_ms
    assert 40 < rtt - penalty < 60


def test_a_call_cut_before_its_status_fails_the_endpoint() -> None:
    mesh = Mesh()
    ex = call(mesh)
    (conn,) = mesh.conns()
    conn.data_received(
        b"HTTP/1.1 200 OK\r\ncontent-type: application/grpc\r\ntransfer-encoding: chunked\r\n"
        b"\r\n5\r\n\0\0\0\0\0\r\n"
    )
    conn.connection_lost(None)
    assert ex.state is State.DONE
    assert mesh.stats[0].failures == 1


def test_unavailable_calls_eject_the_endpoint() -> None:
    """Five UNAVAILABLE in a row (``consecutive_failures``) eject an endpoint: each a 200."""
    mesh = Mesh(outlier={"consecutive_failures": 5, "max_ejection_percent": 50})
    for _ in range(10):  # round robin: five to each
        ex = call(mesh)
        conn = ex.up.conn
        assert isinstance(conn, UpstreamConnection)
        streamed(conn, 14 if conn.pool is mesh.pools[0] else 0)
        assert ex.state is State.DONE
        mesh.clock.advance(0.001)
    ejection = mesh.stats[0].ejection
    assert ejection is not None
    assert ejection.phase is Phase.EJECTED
    assert mesh.stats[1].ejection is None
    assert mesh.service.ejections == 1


def test_the_sidecars_own_answer_to_a_call_is_recorded_with_its_code() -> None:
    """No endpoint: answered as a gRPC failure (``Answer.error``), recorded as what the
    client got, a 200 with UNAVAILABLE."""
    mesh = Mesh()
    ex = call(mesh)
    ex.fail(Reason.NO_HEALTHY_UPSTREAM, "service svc has no endpoints")
    assert grpc_of(mesh) == [(200, 14)]
    assert mesh.client.records[0][6] == "no-healthy-upstream"


def test_a_hedged_call_answered_unavailable_leaves_the_other_try_to_answer() -> None:
    """A call hedged (``x-meshlet-retry: on`` makes a POST hedgeable): the first try's
    trailers-only UNAVAILABLE, a code retry_on lists, loses to the hedge's answer."""
    mesh = Mesh(hedge={"after_ms": 50}, retry_on=["unavailable"])
    head = http1.parse_request_head(
        b"POST",
        b"/pkg.Svc/Do",
        "2",
        [(b"host", b"svc"), GRPC, (b"x-meshlet-retry", b"on"), (b"content-length", b"0")],
        True,
    )
    head.grpc = True
    ex = Exchange(mesh.client, head)
    ex.request_complete()
    ex.start()
    mesh.ring(ex)  # the hedge
    first, hedge = mesh.conns()
    resp = http1.parse_response_head(200, b"", [GRPC])
    resp.grpc_status = 14
    assert first.owner is not None
    assert first.owner.response_head(resp) is False  # the hedged first try lost
    assert closed(first)
    assert mesh.client.written == b""
    streamed(hedge, 0)
    assert mesh.status() == 200
    assert grpc_of(mesh) == [(200, 0)]
    assert [s.failures for s in mesh.stats] == [1, 0]
