"""HTTP/2 over mesh TLS, chosen by ALPN, in process: an outbound listener whose route says
``protocol: http2`` calls an inbound listener over one TLS session that negotiated ``h2``;
the inbound serves it as it serves h2c, behind the same guard. Real sockets, real
certificates from the mesh's CA, a real (HTTP/1.1) app behind the inbound."""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable

from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded

from control_plane.ca import Authority
from tests.sidecar.test_meshtls import LOCAL, WEB, Hop, credentials, get
from tests.sidecar.test_meshtls import ca as ca  # (the fixtures)
from tests.sidecar.test_meshtls import hop as hop

HTTP2 = {"protocol": "http2"}


def pool_of(h: Hop):  # type: ignore[no-untyped-def]
    return next(iter(h.pools._pools.values()))


async def test_an_http2_route_calls_the_next_sidecar_over_h2_in_mesh_tls(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle), policy=HTTP2)
    for path in ("/a", "/b", "/c"):  # one session, its requests multiplexed
        status, _, body = await get(h.outbound, path)
        assert status == 200
        assert json.loads(body)["peer"] == [WEB]  # the caller the inbound verified, over h2
    counters = h.inbound_tracker.counters
    assert (counters.tls_handshakes, counters.tls_h2) == (1, 1)
    assert h.inbound_tracker.h2.connections == 1
    assert h.inbound_tracker.h2.streams == 3
    pool = pool_of(h)
    s = pool.statistics()
    assert (s.tls_h2, s.h2_connections, s.h2_fallback) == (1, 1, False)
    # a second HTTP/2 connection resumes the first one's session (its ticket was kept)
    channel = await pool.connect(h2=True)
    channel.close()
    assert (pool.tls_handshakes, pool.tls_resumed, pool.tls_h2) == (2, 1, 2)


async def test_allow_from_refuses_a_caller_over_h2(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    bundle = [ca.pem()[0].decode()]
    h = await hop(credentials(ca, "web", bundle), credentials(ca, "catalog", bundle), policy=HTTP2)
    h.guard.rules("strict", ("orders",))
    status, headers, body = await get(h.outbound)
    assert status == 403
    assert headers["x-meshlet-error"] == "forbidden"
    assert b"allow_from does not list web" in body
    assert h.guard.forbidden == {"web": 1}
    assert h.inbound_tracker.counters.tls_h2 == 1  # (refused over h2, not before it)


async def test_an_h2_client_over_mesh_tls_is_guarded_and_its_forged_peer_dropped(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    """A TLS client that offers h2 itself (as any mesh TLS caller may) speaks HTTP/2 from the
    first byte; the inbound's guard and x-meshlet-peer work as over HTTP/1.1."""
    bundle = [ca.pem()[0].decode()]
    web = credentials(ca, "web", bundle)
    h = await hop(web, credentials(ca, "catalog", bundle))
    assert web.client_h2 is not None

    async def call() -> tuple[dict[bytes, bytes], bytes]:
        reader, writer = await asyncio.open_connection(
            LOCAL, h.inbound, ssl=web.client_h2, server_hostname=""
        )
        tls = writer.get_extra_info("ssl_object")
        assert isinstance(tls, ssl.SSLObject)
        assert tls.selected_alpn_protocol() == "h2"
        conn = H2Connection(H2Configuration(client_side=True, header_encoding=None))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        request = [(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https")]
        request += [(b":authority", b"catalog"), (b"x-meshlet-peer", b"forged")]
        conn.send_headers(sid, request, end_stream=True)
        writer.write(conn.data_to_send())
        head: dict[bytes, bytes] = {}
        body = b""
        try:
            while True:
                data = await asyncio.wait_for(reader.read(65536), 5)
                assert data, "the inbound closed before the answer"
                for event in conn.receive_data(data):
                    if isinstance(event, ResponseReceived):
                        head = dict(event.headers)
                    elif isinstance(event, DataReceived):
                        body += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, sid)
                    elif isinstance(event, StreamEnded):
                        return head, body
                writer.write(conn.data_to_send())
        finally:
            writer.close()

    head, body = await call()
    assert head[b":status"] == b"200"
    assert json.loads(body)["peer"] == [WEB]
    h.guard.rules("strict", ("orders",))
    head, body = await call()
    assert head[b":status"] == b"403"
    assert head[b"x-meshlet-error"] == b"forbidden"
    assert h.guard.forbidden == {"web": 1}
    assert (h.inbound_tracker.counters.tls_handshakes, h.inbound_tracker.counters.tls_h2) == (2, 2)


async def test_a_sidecar_that_does_not_choose_h2_gets_http1_on_the_same_session(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    """An inbound from before HTTP/2 over TLS offers only http/1.1: the pool sends the request
    over HTTP/1.1 on the session it opened, and keeps calling that endpoint so."""
    bundle = [ca.pem()[0].decode()]
    catalog = credentials(ca, "catalog", bundle)
    assert catalog.server is not None
    catalog.server.set_alpn_protocols(["http/1.1"])
    h = await hop(credentials(ca, "web", bundle), catalog, policy=HTTP2)
    for path in ("/a", "/b"):
        status, _, body = await get(h.outbound, path)
        assert status == 200
        assert json.loads(body)["peer"] == [WEB]
    pool = pool_of(h)
    s = pool.statistics()
    assert (s.h2_fallback, s.tls_h2, s.h2_connections, s.connects) == (True, 0, 0, 1)
    assert h.inbound_tracker.counters.tls_h2 == 0
    assert h.inbound_tracker.counters.tls_handshakes == 1  # (the second call reused it)
    pool.rekey("")  # another identity: the endpoint is asked for h2 again
    assert not pool.statistics().h2_fallback


async def test_a_session_kept_from_before_a_rotation_is_not_offered_to_the_new_context(
    ca: Authority, hop: Callable[..., asyncio.Future[Hop]]
) -> None:
    """Python refuses to resume a session of another context (ValueError): after a rotation
    the pool opens a full handshake instead of failing a connect."""
    bundle = [ca.pem()[0].decode()]
    web = credentials(ca, "web", bundle)
    h = await hop(web, credentials(ca, "catalog", bundle), policy=HTTP2)
    assert (await get(h.outbound))[0] == 200
    pool = pool_of(h)
    # (a second connection: the first one's ticket is kept now)
    (await pool.connect(h2=True)).close()
    assert pool.tls_resumed == 1
    rotated = credentials(ca, "web", bundle)  # the identity manager's new contexts
    web.put((rotated.server, rotated.client, rotated.client_h2), web.identity)  # type: ignore[arg-type]
    (await pool.connect(h2=True)).close()
    assert (pool.tls_handshakes, pool.tls_resumed) == (3, 1)  # a full handshake, no failure
    assert (await get(h.outbound))[0] == 200
    assert pool.stats.failures == 0
