"""HTTP/2 from clients (h2c, prior knowledge) through the sidecar's listeners to HTTP/1.1
upstreams: curl and h2load, streams side by side, bodies and back-pressure both ways, trailers,
what an exchange does per stream, and the attacks each refused with a GOAWAY."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
from collections.abc import Awaitable, Callable

import hpack
import pytest
from h2.exceptions import ProtocolError

from sidecar.proxy.watch import Timeouts
from tests.sidecar.conftest import (
    LOCAL,
    NO_OUTLIER,
    Mesh,
    RawUpstream,
    Upstream,
    read_head,
    service,
    svc,
)
from tests.sidecar.h2client import (
    H2Client,
    H2Response,
    continuation_frame,
    goaway_code,
    headers_frame,
    ping_frame,
    request_block,
    rst_frame,
    send_raw,
    settings_frame,
)

MakeMesh = Callable[..., Awaitable[Mesh]]
Upstreams = Callable[[str], Awaitable[Upstream]]
RawUpstreams = Callable[..., Awaitable[RawUpstream]]
PROTOCOL_ERROR = 0x1
ENHANCE_YOUR_CALM = 0xB
MiB = 1024 * 1024


@pytest.fixture
async def up(upstreams: Upstreams) -> Upstream:
    return await upstreams("up")


@pytest.fixture
async def mesh(up: Upstream, make_mesh: MakeMesh) -> Mesh:
    return await make_mesh({"svc": service(up.port, timeout_ms=10000)}, app_port=up.port)


async def run(*cmd: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode(errors="replace")


async def metrics(mesh: Mesh) -> str:
    reader, writer = await asyncio.open_connection(LOCAL, mesh.metrics)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = await reader.read()
    writer.close()
    return data.decode()


async def settled(read: Callable[[], int]) -> int:
    """What ``read`` says once it stops changing (the same over 0.5 s), within 10 s."""
    last = -1
    for _ in range(20):
        await asyncio.sleep(0.5)
        now = read()
        if now == last:
            return now
        last = now
    raise AssertionError(f"still moving after 10 s: {last}")


def sample(text: str, name: str, **labels: str) -> float:
    """One sample of ``name`` whose labels include ``labels`` (0 if none)."""
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


# -- curl, h2load --------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_prior_knowledge_through_outbound_and_inbound(mesh: Mesh) -> None:
    url = f"http://{LOCAL}:{mesh.outbound}/echo/out"
    code, out = await run("curl", "-sS", "--http2-prior-knowledge", "-i", "-H", "Host: svc", url)
    assert code == 0, out
    assert out.startswith("HTTP/2 200")
    seen = json.loads(out.split("\r\n\r\n", 1)[1])
    assert (seen["path"], seen["version"]) == ("/echo/out", "1.1")  # HTTP/1.1 upstream
    assert ["host", "svc"] in seen["headers"]
    # the inbound forwards to the app, a body with it
    url = f"http://{LOCAL}:{mesh.inbound}/echo/in"
    code, out = await run("curl", "-sS", "--http2-prior-knowledge", "-i", "-d", "hello", url)
    assert code == 0, out
    assert out.startswith("HTTP/2 200")
    seen = json.loads(out.split("\r\n\r\n", 1)[1])
    assert (seen["method"], seen["body_sample"]) == ("POST", "hello")


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) is missing")
async def test_h2load_through_the_outbound(mesh: Mesh) -> None:
    url = f"http://{LOCAL}:{mesh.outbound}/status/200"
    code, out = await run(
        "h2load", "-n", "2000", "-c", "4", "-m", "10", "-H", ":authority: svc", url
    )
    assert code == 0, out
    assert re.search(r"2000 total, 2000 started, 2000 done, 2000 succeeded, 0 failed", out), out
    assert "status codes: 2000 2xx" in out
    text = await metrics(mesh)
    assert sample(text, "meshlet_requests_total", direction="outbound", service="svc") >= 2000
    assert sample(text, "meshlet_h2_connections_total", direction="outbound") == 4
    assert sample(text, "meshlet_h2_streams_total", direction="outbound") == 2000


# -- streams, bodies, trailers ---------------------------------------------------------------


async def test_concurrent_streams_are_answered_independently(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        slow = client.start("/slow?delay=2")
        fast = [client.start(f"/echo/{n}") for n in range(20)]
        answered = await asyncio.gather(*(client.response(sid, within=1.5) for sid in fast))
        assert [resp.status for resp in answered] == [200] * 20
        assert not client.responses[slow].done.is_set()  # not behind the slow one
        resp = await client.response(slow)
        assert (resp.status, bytes(resp.body)) == (200, b"slow")
        paths = {json.loads(client.responses[sid].body)["path"] for sid in fast}
        assert paths == {f"/echo/{n}" for n in range(20)}
    finally:
        await client.close()


async def test_large_bodies_both_ways(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        upload = await client.request("/consume", method="POST", body=b"u" * (6 * MiB))
        assert (upload.status, json.loads(upload.body)) == (200, {"received": 6 * MiB})
        down = await client.request(f"/sized?size={8 * MiB}")
        assert (down.status, len(down.body), down.header(b"content-length")) == (
            200,
            8 * MiB,
            str(8 * MiB).encode(),
        )
        chunked = await client.request(f"/chunked?size={3 * MiB}")
        assert (chunked.status, len(chunked.body)) == (200, 3 * MiB)
    finally:
        await client.close()


async def test_head_no_content_and_repeated_headers(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        head = await client.request("/sized?size=5000", method="HEAD")
        no_content = await client.request("/status/204")
        cookies = await client.request("/cookies")
    finally:
        await client.close()
    assert (head.status, head.header(b"content-length"), bytes(head.body)) == (200, b"5000", b"")
    assert (no_content.status, bytes(no_content.body)) == (204, b"")
    assert [v for n, v in cookies.headers if n == b"set-cookie"] == [b"a=1; Path=/", b"b=2; Path=/"]
    assert cookies.header(b"keep-alive") is None  # hop-by-hop, and no HTTP/2 header
    assert [n for n, _ in cookies.headers if n.startswith(b"x-order")] == [
        b"x-order-1",
        b"x-order-2",
    ]


async def test_a_response_ends_with_its_last_data_frame_or_its_head(mesh: Mesh) -> None:
    """END_STREAM goes on the last DATA frame of a body whose end came with it, and on the
    HEADERS of a response that has no body: never on an empty DATA frame after them."""
    client = await H2Client.open(mesh.outbound)
    try:
        sized = await client.request("/sized?size=5000")
        echoed = await client.request("/echo")
        head = await client.request("/sized?size=5000", method="HEAD")
        no_content = await client.request("/status/204")
    finally:
        await client.close()
    assert (sized.status, sum(sized.data_frames), sized.data_frames[-1] > 0) == (200, 5000, True)
    assert echoed.status == 200
    assert echoed.data_frames == [len(echoed.body)]
    assert (head.status, head.data_frames) == (200, [])
    assert (no_content.status, no_content.data_frames) == (204, [])


async def test_trailers_both_ways(raw_upstream: RawUpstreams, make_mesh: MakeMesh) -> None:
    got: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_head(reader)
        rest = await reader.readuntil(b"0\r\n")
        rest += await reader.readuntil(b"\r\n\r\n")
        got.append(head + rest)
        writer.write(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
            b"3\r\nabc\r\n3\r\ndef\r\n0\r\nX-Checksum: 42\r\n\r\n"
        )

    upstream = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(upstream.port)})
    client = await H2Client.open(mesh.outbound)
    try:
        resp = await client.request("/", method="POST", body=b"hi", trailers=[(b"x-req", b"yes")])
    finally:
        await client.close()
    assert (resp.status, bytes(resp.body)) == (200, b"abcdef")
    assert resp.trailers == [(b"x-checksum", b"42")]
    assert b"transfer-encoding: chunked" in got[0].lower()
    assert got[0].endswith(b"2\r\nhi\r\n0\r\nx-req: yes\r\n\r\n")


async def test_100_continue_is_passed_to_the_client(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.start(
            "/consume",
            method="POST",
            headers=[(b"expect", b"100-continue"), (b"content-length", b"5")],
            end=False,
        )
        async with asyncio.timeout(5):  # the upstream's 100, before any body was sent
            await client.responses[sid].interim_seen.wait()
        await client.send_body(sid, b"hello")
        resp = await client.response(sid)
    finally:
        await client.close()
    assert resp.interim == [100]
    assert (resp.status, json.loads(resp.body)) == (200, {"received": 5})


async def test_an_upstream_cut_mid_body_resets_the_stream(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()
        writer.close()  # 993 bytes short

    upstream = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(upstream.port)})
    client = await H2Client.open(mesh.outbound)
    try:
        resp = await client.request("/cut")
        assert (resp.status, resp.reset) == (200, 0x2)  # INTERNAL_ERROR: never seen as whole
        assert (await client.request("/cut")).reset == 0x2  # and the connection goes on
    finally:
        await client.close()


async def test_a_stream_the_client_resets_cancels_its_request(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.start("/slow?delay=1")
        await asyncio.sleep(0.2)
        client.conn.reset_stream(sid, 0x8)  # CANCEL
        client.flush()
        assert (await client.request("/echo")).status == 200
    finally:
        await client.close()
    text = await metrics(mesh)  # the request left first: recorded, its code "none"
    assert sample(text, "meshlet_requests_total", service="svc", code="none") == 1
    assert sample(text, "meshlet_requests_total", service="svc", code="2xx") == 1


async def test_a_client_that_grants_no_window_pauses_the_upstream(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    sent = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (256 * MiB))
        block = b"x" * 65536
        while sent[0] < 256 * MiB:
            writer.write(block)
            await writer.drain()
            sent[0] += len(block)

    upstream = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(upstream.port)})
    client = await H2Client.open(mesh.outbound, auto_ack=False)  # reads, never gives window
    try:
        sid = client.start("/big")
        first = await settled(lambda: sent[0])  # the upstream is held, not read into memory
        assert first < 24 * MiB  # socket buffers and a window's worth, not the body
        assert len(client.responses[sid].body) <= 65_535
        # a second connection is served meanwhile
        other = await H2Client.open(mesh.outbound)
        resp = await other.request("/", authority="nowhere")
        await other.close()
        assert resp.status == 404
    finally:
        await client.close()


async def test_a_body_held_for_window_goes_out_when_the_client_gives_it(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound, auto_ack=False)
    try:
        sid = client.start(f"/sized?size={1 * MiB}")
        await asyncio.sleep(0.3)
        resp = client.responses[sid]
        assert (resp.status, len(resp.body)) == (200, 65_535)  # the initial window, no more
        client.auto_ack = True
        client.conn.acknowledge_received_data(len(resp.body), sid)
        client.flush()
        resp = await client.response(sid)
        assert len(resp.body) == MiB
        # the stream is over for the sidecar too: a drain closes the connection at once
        mesh.sidecar.outbound.drain()
        async with asyncio.timeout(1):
            await client.closed.wait()
    finally:
        await client.close()


async def test_a_client_that_does_not_read_pauses_the_upstream(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    sent = [0]

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (256 * MiB))
        block = b"x" * 65536
        while sent[0] < 256 * MiB:
            writer.write(block)
            await writer.drain()
            sent[0] += len(block)

    upstream = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(upstream.port)})
    _, writer = await asyncio.open_connection(LOCAL, mesh.outbound)
    # a client that opens a stream with all the window it can give, and stops reading
    big = (2**31 - 1).to_bytes(4, "big")
    settings = b"\x00\x00\x06\x04\x00\x00\x00\x00\x00" + b"\x00\x04" + big
    update = b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" + (2**31 - 1 - 65_535).to_bytes(4, "big")
    block = request_block(hpack.Encoder(), "/big")
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + settings + update + headers_frame(1, block))
    try:
        first = await settled(lambda: sent[0])
        assert first < 48 * MiB  # socket buffers both sides and a stream's hold, not 256 MiB
    finally:
        writer.close()


async def test_an_upstream_that_does_not_read_holds_the_client_by_its_window(
    raw_upstream: RawUpstreams, make_mesh: MakeMesh
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        await asyncio.sleep(30)  # reads nothing of the body

    upstream = await raw_upstream(handler)
    mesh = await make_mesh({"svc": service(upstream.port, timeout_ms=30000)})
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.start("/upload", method="POST", end=False)
        sending = asyncio.create_task(client.send_body(sid, b"u" * (256 * MiB)))
        first = await settled(lambda: client.sent[sid])  # its windows spent, not given back
        assert 0 < first < 24 * MiB  # socket buffers and the windows, not the 256 MiB
        assert not sending.done()
        sending.cancel()
    finally:
        await client.close()


# -- what an exchange does, per stream -----------------------------------------------------------


async def test_synthetic_errors_timeouts_deadlines_and_retries_per_stream(
    upstreams: Upstreams, make_mesh: MakeMesh
) -> None:
    busy, fine = await upstreams("busy"), await upstreams("fine")
    mesh = await make_mesh(
        {
            "svc": service(fine.port, timeout_ms=300, connect_timeout_ms=200),
            "flaky": svc(busy, fine, retries=1, outlier=NO_OUTLIER)["svc"],
        }
    )
    client = await H2Client.open(mesh.outbound)
    try:
        no_route, timed_out, deadline, fast = await asyncio.gather(
            client.request("/", authority="nowhere"),
            client.request("/slow?delay=2"),  # the route's 300 ms
            client.request(
                "/slow?delay=2", authority="svc", headers=[(b"x-meshlet-timeout-ms", b"100")]
            ),
            client.request("/echo"),
        )
        retried = [await client.request("/behave", authority="flaky") for _ in range(4)]
    finally:
        await client.close()
    assert (no_route.status, no_route.header(b"x-meshlet-error")) == (404, b"no-route")
    assert bytes(no_route.body).startswith(b"no-route: ")
    assert (timed_out.status, timed_out.header(b"x-meshlet-error")) == (504, b"upstream-timeout")
    assert b"300 ms" in timed_out.body
    assert (deadline.status, deadline.header(b"x-meshlet-error")) == (504, b"upstream-timeout")
    assert b"caller" in deadline.body
    assert fast.status == 200
    # each 503 from "busy" is retried on "fine"
    assert [r.status for r in retried] == [200] * 4
    assert busy.hits >= 1
    assert fine.hits == 4


async def test_a_stream_with_a_nearer_deadline_than_those_open_times_out_by_it(
    mesh: Mesh,
) -> None:
    """The streams of a connection share one timer, armed by their nearest deadline: one
    opened after a stream with a later deadline still times out by its own."""
    loop = asyncio.get_running_loop()
    client = await H2Client.open(mesh.outbound)
    try:
        long = client.start("/slow?delay=1.5")  # the route's 10 s
        await asyncio.sleep(0.05)
        started = loop.time()
        short = await client.request("/slow?delay=1.5", headers=[(b"x-meshlet-timeout-ms", b"200")])
        took = loop.time() - started
        slow = await client.response(long)
    finally:
        await client.close()
    assert (short.status, short.header(b"x-meshlet-error")) == (504, b"upstream-timeout")
    assert 0.15 <= took < 1.0
    assert (slow.status, bytes(slow.body)) == (200, b"slow")


async def test_bodies_that_end_their_streams_give_the_connection_window_back_both_ways(
    up: Upstream, make_mesh: MakeMesh
) -> None:
    """Requests whose one DATA frame ends the stream, and responses whose last DATA frame
    does, 1.6 MiB each way on one connection (its window: 1 MiB): their window comes back
    to the connection a few at a time, and none waits for it. Through two sidecars, the
    first speaking HTTP/2 to the second."""
    callee = await make_mesh({}, app_port=up.port)
    caller = await make_mesh({"svc": service(callee.inbound, protocol="http2")})
    client = await H2Client.open(caller.outbound)
    body = b"x" * 16384  # (one frame: the codec's largest)
    try:
        for _ in range(100):
            sid = client.start("/consume", method="POST", end=False)
            client.conn.send_data(sid, body, end_stream=True)
            client.flush()
            resp = await client.response(sid, within=5)
            assert json.loads(bytes(resp.body)) == {"received": 16384}
        for _ in range(100):
            resp = await client.request("/sized?size=16384", within=5)
            assert (resp.status, len(resp.body)) == (200, 16384)
    finally:
        await client.close()


async def test_a_post_answered_early_resets_the_rest_of_its_body(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.start("/upload", method="POST", authority="nowhere", end=False)
        resp = await client.response(sid)
        assert (resp.status, resp.reset) == (404, 0)  # answered, then RST_STREAM NO_ERROR
        assert (await client.request("/echo")).status == 200  # the connection goes on
    finally:
        await client.close()


async def test_connect_is_refused_400_and_the_connection_goes_on(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.conn.get_next_available_stream_id()
        client.responses[sid] = H2Response()
        client.conn.send_headers(
            sid, [(b":method", b"CONNECT"), (b":authority", b"example.com:443")], end_stream=True
        )
        client.flush()
        connect = await client.response(sid)
        other = await client.request("/echo")
    finally:
        await client.close()
    assert (connect.status, connect.header(b"x-meshlet-error")) == (400, b"bad-request")
    assert b"CONNECT" in connect.body
    assert other.status == 200


async def test_drain_says_goaway_and_finishes_the_streams_open(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.start("/slow?delay=0.3")
        await asyncio.sleep(0.1)
        mesh.sidecar.outbound.drain()
        resp = await client.response(sid)
        assert (resp.status, bytes(resp.body)) == (200, b"slow")
        async with asyncio.timeout(5):
            await client.closed.wait()
        assert client.goaway == 0
    finally:
        await client.close()


async def test_an_idle_connection_is_drained_the_idle_timeout_after_its_last_stream(
    up: Upstream, make_mesh: MakeMesh
) -> None:
    """The listener's idle timeout counts from the end of the connection's last stream (not
    from its start, nor its first stream's end), and a stream open past it keeps the
    connection: then a GOAWAY (NO_ERROR) and the close."""
    mesh = await make_mesh({"svc": service(up.port)}, timeouts=Timeouts(idle=0.5))
    loop = asyncio.get_running_loop()
    client = await H2Client.open(mesh.outbound)
    try:
        assert (await client.request("/echo")).status == 200
        await asyncio.sleep(0.3)
        assert (await client.request("/echo")).status == 200
        last = loop.time()
        await asyncio.sleep(0.35)  # past the first stream's end + 0.5, not the last's
        assert not client.closed.is_set()
        slow = await client.request("/slow?delay=0.8")  # open across a whole idle timeout
        assert (slow.status, bytes(slow.body)) == (200, b"slow")
        last = loop.time()
        assert not client.closed.is_set()
        async with asyncio.timeout(5):
            await client.closed.wait()
        assert loop.time() - last >= 0.45
        assert client.goaway == 0
    finally:
        await client.close()


async def test_a_silent_stream_is_ended_by_the_routes_idle_timeout(
    up: Upstream, make_mesh: MakeMesh
) -> None:
    mesh = await make_mesh({"svc": service(up.port, stream_idle_timeout_ms=300)})
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.start("/consume", method="POST", end=False)  # and no body comes
        resp = await client.response(sid, within=3)
        assert (resp.status, resp.header(b"x-meshlet-error")) == (408, b"request-timeout")
        assert mesh.sidecar.outbound.counters.stream_idle == 1
        assert (await client.request("/echo")).status == 200  # the connection goes on
    finally:
        await client.close()
    for _ in range(250):  # and once closed, the listener counts it no more
        if not mesh.sidecar.outbound.connections:
            break
        await asyncio.sleep(0.02)
    assert not mesh.sidecar.outbound.connections


async def test_a_body_slower_than_the_minimum_rate_is_408(
    up: Upstream, make_mesh: MakeMesh
) -> None:
    mesh = await make_mesh({"svc": service(up.port)}, min_data_rate=1000, data_rate_grace=0.3)
    client = await H2Client.open(mesh.outbound)
    try:
        sid = client.start("/consume", method="POST", end=False)
        await client.send_body(sid, b"x" * 10, end=False)  # and then a byte now and then
        trickle = asyncio.create_task(trickle_body(client, sid))
        resp = await client.response(sid, within=5)
        trickle.cancel()
        assert (resp.status, resp.header(b"x-meshlet-error")) == (408, b"request-timeout")
        assert b"slower than 1000 bytes/s" in resp.body
        assert mesh.sidecar.outbound.counters.request_body_rate == 1
        assert (await client.request("/echo")).status == 200  # the connection goes on
    finally:
        await client.close()


async def trickle_body(client: H2Client, sid: int) -> None:
    with contextlib.suppress(ProtocolError):  # (the stream ended under it)
        while not client.responses[sid].done.is_set():
            await asyncio.sleep(0.05)
            await client.send_body(sid, b"x", end=False)


# -- attacks, each refused with a GOAWAY and counted ---------------------------------------------


async def assert_still_serving(mesh: Mesh) -> None:
    client = await H2Client.open(mesh.outbound)
    try:
        assert (await client.request("/echo")).status == 200
    finally:
        await client.close()


async def refused(mesh: Mesh, reason: str) -> float:
    return sample(await metrics(mesh), "meshlet_h2_refused_total", reason=reason)


async def test_more_streams_than_allowed_is_a_protocol_error(mesh: Mesh) -> None:
    enc = hpack.Encoder()
    opened = b"".join(
        headers_frame(2 * n + 1, request_block(enc, "/slow?delay=3"), end_stream=False)
        for n in range(101)
    )
    frames = await send_raw(mesh.outbound, opened)
    assert goaway_code(frames) == PROTOCOL_ERROR
    assert await refused(mesh, "max_streams") == 1
    await assert_still_serving(mesh)


@pytest.mark.parametrize(
    "extra",
    [[(b"X-Upper", b"1")], [(b"x", b"a\r\nx-injected: 1")], [(b"connection", b"close")]],
)
async def test_a_malformed_request_is_a_protocol_error(
    mesh: Mesh, extra: list[tuple[bytes, bytes]]
) -> None:
    """What RFC 9113 calls malformed (the sidecar's own check: the codec's is off) gets a
    GOAWAY, as the codec's check gave it, and is counted."""
    frames = await send_raw(
        mesh.outbound, headers_frame(1, request_block(hpack.Encoder(), extra=extra))
    )
    assert goaway_code(frames) == PROTOCOL_ERROR
    assert await refused(mesh, "protocol") == 1
    await assert_still_serving(mesh)


async def test_a_pseudo_header_in_trailers_is_a_protocol_error(mesh: Mesh) -> None:
    enc = hpack.Encoder()
    head = headers_frame(1, request_block(enc, extra=[(b"te", b"trailers")]), end_stream=False)
    trailers = headers_frame(1, enc.encode([(b":path", b"/other")]))
    frames = await send_raw(mesh.outbound, head + trailers)
    assert goaway_code(frames) == PROTOCOL_ERROR
    assert await refused(mesh, "protocol") == 1
    await assert_still_serving(mesh)


async def test_rapid_reset_is_refused(mesh: Mesh) -> None:
    enc = hpack.Encoder()
    attack = b"".join(
        headers_frame(2 * n + 1, request_block(enc, "/slow?delay=1")) + rst_frame(2 * n + 1)
        for n in range(300)
    )
    frames = await send_raw(mesh.outbound, attack)
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert await refused(mesh, "rapid_reset") == 1
    await assert_still_serving(mesh)


async def test_continuation_flood_is_refused(mesh: Mesh) -> None:
    block = request_block(hpack.Encoder())
    flood = headers_frame(1, block, end_headers=False) + b"".join(
        continuation_frame(1, b"\x00" * 16_000) for _ in range(100)
    )
    frames = await send_raw(mesh.outbound, flood)
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert await refused(mesh, "header_block") == 1
    await assert_still_serving(mesh)


async def test_hpack_bomb_over_the_header_list_size_is_refused(mesh: Mesh) -> None:
    big = (b"x-big", b"b" * 3000)
    # the first one literal, the others one byte each (indexed): ~120 KiB decoded from 3 KiB
    bomb = request_block(hpack.Encoder(), extra=[big] * 40)
    assert len(bomb) < 4000
    frames = await send_raw(mesh.outbound, headers_frame(1, bomb))
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert await refused(mesh, "header_list") == 1
    await assert_still_serving(mesh)


@pytest.mark.parametrize(
    ("frame", "reason"),
    [(lambda n: settings_frame(), "settings_flood"), (ping_frame, "ping_flood")],
)
async def test_settings_and_ping_floods_are_refused(
    mesh: Mesh, frame: Callable[[int], bytes], reason: str
) -> None:
    frames = await send_raw(mesh.outbound, b"".join(frame(n) for n in range(500)))
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    assert await refused(mesh, reason) == 1
    await assert_still_serving(mesh)


async def test_the_inbound_refuses_as_the_outbound_does(mesh: Mesh) -> None:
    enc = hpack.Encoder()
    attack = b"".join(
        headers_frame(2 * n + 1, request_block(enc, "/echo")) + rst_frame(2 * n + 1)
        for n in range(300)
    )
    frames = await send_raw(mesh.inbound, attack)
    assert goaway_code(frames) == ENHANCE_YOUR_CALM
    text = await metrics(mesh)
    assert sample(text, "meshlet_h2_refused_total", direction="inbound", reason="rapid_reset") == 1
    assert sample(text, "meshlet_h2_refused_total", direction="outbound", reason="rapid_reset") == 0
    client = await H2Client.open(mesh.inbound)
    try:
        assert (await client.request("/echo")).status == 200
    finally:
        await client.close()
