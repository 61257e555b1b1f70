"""Instructions per request of two sidecar hops, plaintext vs mesh TLS, counted by callgrind,
beside HAProxy's two hops without and with the same TLS.

Issue 15's goal: mTLS costs <= 1.3x the plaintext mesh per request on kept-alive connections.
Each meshlet variant is one Python process under ``valgrind --tool=callgrind`` holding both
hops, built as the sidecar builds its listeners (``serve`` below): an outbound listener (caller
"bench-client") routing to an inbound listener (service "bench-server", its guard in force)
before bench_proxy's nginx backend (1 KiB body, not under valgrind):
  plain        client -> outbound -> plaintext -> inbound -> backend
  mtls         client -> outbound -> mesh TLS 1.3 (both certificates verified) -> inbound -> backend
  haproxy      client -> HAProxy -> plaintext -> HAProxy -> backend (two processes, counted both)
  haproxy-tls  the same with TLS 1.3 between them, as bench_proxy's (mesh_tls.haproxy_tls)
  ssl-floor    no proxy: one request's four records (request encrypted, decrypted; answer
               encrypted, decrypted) through Python's ``ssl`` over memory BIOs, nothing else
HAProxy pays OpenSSL's per-record cost as we do, in C around it: its ratio says how much of ours
is OpenSSL's. The floor says what TLS costs a Python sidecar that uses the ``ssl`` module, however
little code it puts around it. The certificates come from one CA (mesh_tls.make_pki), as the
control plane would sign them.
This process is the client, as in bench_instructions: ``--connections`` keep-alive connections
per variant and round (default one), each one request at a time, each answer read in full;
``--warmup`` requests (the handshakes, the pools; with several connections, repeated until a
pass opens no socket), ``callgrind_control -z``, ``--requests`` requests and a dump, then as
long idle and a second dump; instructions per request = (measured - idle) / requests.

Printed: min/median/max over the rounds per variant, of the per-round ratios mtls / plain and
haproxy-tls / haproxy, of what TLS adds to a request in each (instructions), and of
(plain + ssl-floor) / plain: the lowest mtls / plain the ``ssl`` module allows.
``--keep`` keeps the dumps: ``callgrind_annotate --inclusive=yes <dump>`` shows where the
instructions go.

Run: .venv/bin/python tests/benchmarks/bench_mtls_instructions.py [--requests 2000]
     [--warmup 300] [--rounds 3] [--connections 1] [--keep] [--pure]
Needs valgrind, nginx and haproxy. About 6 minutes for 3 rounds on two cores.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import re
import shutil
import signal
import socket
import ssl
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType
from typing import Final

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script: ``tests`` from the repo root

from sidecar.tls import MeshTls, mesh_contexts  # noqa: E402
from tests.benchmarks import mesh_tls  # noqa: E402
from tests.benchmarks.bench_instructions import PURE, Counted, Lab, build_of  # noqa: E402
from tests.benchmarks.bench_proxy import LOAD_CORE, free_port, wait_port  # noqa: E402

SERVICE, CALLER = "bench-server", "bench-client"
START_TIMEOUT = 600.0
"""seconds a process under valgrind may take to listen"""
GOAL = 1.3
"""mtls / plain instructions per request (issue 15)"""


# -- the process under callgrind: both hops ----------------------------------------------------


def _mesh(pem: Path, pki: mesh_tls.Pki, service: str) -> MeshTls:
    """The credentials of ``service`` from its PEM file (certificate, then key)."""
    data = pem.read_bytes()
    cut = data.index(b"-----BEGIN PRIVATE KEY-----")
    mesh = MeshTls()
    mesh.trust_domain = pki.trust_domain
    mesh.put(
        mesh_contexts(data[:cut], data[cut:], [pki.ca_cert.read_text()]), pki.identity(service)
    )
    return mesh


async def _serve(port: int, backend: int, mtls: bool, pki: mesh_tls.Pki) -> None:
    from control_plane.wire import Endpoint, parse_table
    from sidecar.proxy.guard import InboundGuard
    from sidecar.proxy.listener import Downstream
    from sidecar.proxy.routing import AppRouter, Pools, TableHolder
    from sidecar.proxy.tracker import ConnectionTracker
    from sidecar.proxy.watch import Timeouts

    loop = asyncio.get_running_loop()
    server_mesh, client_mesh = _mesh(pki.server, pki, SERVICE), _mesh(pki.client, pki, CALLER)
    guard = InboundGuard(server_mesh, SERVICE)
    inbound = ConnectionTracker("inbound", SERVICE, metrics=True, guard=guard)
    app = AppRouter(Endpoint("127.0.0.1", backend), Pools())
    timeouts = Timeouts()
    in_server = await loop.create_server(
        lambda: Downstream(app, inbound, timeouts, loop), "127.0.0.1", 0
    )
    in_port = in_server.sockets[0].getsockname()[1]
    pools = Pools(mesh=client_mesh if mtls else None)
    tables = TableHolder(pools, service=CALLER)
    # (a handshake under valgrind takes seconds: the policy waits for it)
    policy = {"connect_timeout_ms": 60_000, "timeout_ms": 120_000}
    endpoints = [{"address": "127.0.0.1", "port": in_port}]
    table = parse_table({"services": {SERVICE: {"endpoints": endpoints, "policy": policy}}})
    tables.install(table, "bench")
    pools.get(table.services[SERVICE].endpoints[0]).rekey(pki.identity(SERVICE) if mtls else "")
    outbound = ConnectionTracker("outbound", metrics=True)
    await loop.create_server(
        lambda: Downstream(tables, outbound, timeouts, loop), "127.0.0.1", port
    )
    await asyncio.Event().wait()  # (until the bench kills the process)


def serve(argv: list[str]) -> int:
    import uvloop

    parser = argparse.ArgumentParser(prog="serve")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backend", type=int, required=True)
    parser.add_argument("--mtls", action="store_true")
    parser.add_argument("--pki", type=Path, required=True)
    parser.add_argument("--trust-domain", default="cluster.local")
    args = parser.parse_args(argv)
    d = args.pki
    pki = mesh_tls.Pki(
        d / "ca.pem", d / "ca.key", d / "server.pem", d / "client.pem", args.trust_domain
    )
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(args.port, args.backend, args.mtls, pki))
    return 0


# -- the floor: Python's ssl module alone ---------------------------------------------------------

#: a request and an answer of the size the mesh's records carry (bench "GET /", 1 KiB body)
_FLOOR_REQUEST: Final = b"GET / HTTP/1.1\r\nHost: bench-server\r\n" + b"x" * 160 + b"\r\n\r\n"
_FLOOR_ANSWER: Final = b"HTTP/1.1 200 OK\r\n" + b"h" * 150 + b"\r\n\r\n" + b"b" * 1024


def floor(argv: list[str]) -> None:
    """What one request's four records cost through ``ssl`` with nothing around them: a mesh
    TLS session over memory BIOs between two contexts of this process, the request encrypted
    and decrypted one way and the answer the other (as an outbound and an inbound sidecar do).
    Served on ``--port``: a line "N" runs N requests and is answered "ok"."""
    parser = argparse.ArgumentParser(prog="floor")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pki", type=Path, required=True)
    args = parser.parse_args(argv)
    ca = (args.pki / "ca.pem").read_text()
    contexts = []
    for pem in (args.pki / "server.pem", args.pki / "client.pem"):
        data = pem.read_bytes()
        cut = data.index(b"-----BEGIN PRIVATE KEY-----")
        contexts.append(mesh_contexts(data[:cut], data[cut:], [ca]))
    to_server, from_client, to_client, from_server = (ssl.MemoryBIO() for _ in range(4))
    server = contexts[0][0].wrap_bio(to_server, from_server, server_side=True)
    client = contexts[1][1].wrap_bio(to_client, from_client)
    while not (server.version() and client.version()):
        for side in (client, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        to_server.write(from_client.read())
        to_client.write(from_server.read())
    # the session's C objects, as TlsLayer calls them (``SSLObject``'s methods wrap them)
    client_core, server_core = client._sslobj, server._sslobj  # type: ignore[attr-defined]
    with socket.create_server(("127.0.0.1", args.port)) as listener:
        while True:  # (until the bench kills the process; wait_port's probe comes first)
            conn, _ = listener.accept()
            with conn, conn.makefile("rwb") as lines:
                for line in lines:
                    for _ in range(int(line)):
                        client_core.write(_FLOOR_REQUEST)
                        to_server.write(from_client.read())
                        server_core.read(16 * 1024)
                        server_core.write(_FLOOR_ANSWER)
                        to_client.write(from_server.read())
                        client_core.read(16 * 1024)
                    lines.write(b"ok\n")
                    lines.flush()


def measure_floor(port: int, hops: list[Counted], warmup: int, requests: int) -> float:
    """``measure`` for the floor: instructions per request of its process."""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as conn:
        lines = conn.makefile("rwb")

        def run(n: int) -> None:
            lines.write(b"%d\n" % n)
            lines.flush()
            if lines.readline() != b"ok\n":
                raise RuntimeError("the floor process did not answer")

        run(warmup)
        for hop in hops:
            hop.control("-z")
        run(requests)
        return sum(hop.dump() for hop in hops) / requests


# -- the bench: the client, counting --------------------------------------------------------------


def get(conn: http.client.HTTPConnection, n: int, expect: bytes) -> None:
    for _ in range(n):
        conn.putrequest("GET", "/", skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", SERVICE)  # the only header
        conn.endheaders()
        with conn.getresponse() as answer:
            body = answer.read()
        if answer.status != 200 or body != expect:
            raise RuntimeError(f"answer {answer.status} with {len(body)} bytes")


def peer_seen(port: int) -> bytes:
    """The x-meshlet-peer the backend saw through ``port`` (b"": none)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", "/peer", headers={"Host": SERVICE})
        return conn.getresponse().read()
    finally:
        conn.close()


_REQUEST: Final = f"GET / HTTP/1.1\r\nHost: {SERVICE}\r\n\r\n".encode()


async def _get_many(
    links: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], n: int, expect: bytes
) -> None:
    """``n`` requests spread over ``links``, each link one request at a time."""
    left = n

    async def one_link(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal left
        while left > 0:
            left -= 1
            writer.write(_REQUEST)
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])  # type: ignore[index]
            body = await reader.readexactly(length)
            if not head.startswith(b"HTTP/1.1 200 ") or body != expect:
                raise RuntimeError(f"answer {head!r} {body[:200]!r}")

    await asyncio.gather(*(one_link(r, w) for r, w in links))


WARMUP_PASSES: Final = 8
"""at most, with ``--connections``"""


def _sockets(hops: list[Counted]) -> int:
    """The sockets the processes of ``hops`` hold."""
    held = 0
    for hop in hops:
        fds = Path(f"/proc/{hop.proc.pid}/fd")
        held += sum(os.readlink(fd).startswith("socket:") for fd in fds.iterdir())
    return held


async def _measure_many(
    port: int, hops: list[Counted], warmup: int, requests: int, connections: int
) -> float:
    """``measure`` over ``connections`` kept-alive connections used at once: every one is
    open (its handshake done) before the counters are zeroed, and stays open to the end."""
    links = [await asyncio.open_connection("127.0.0.1", port) for _ in range(connections)]
    body = b"b" * 1024
    try:
        # Warm-up passes until one opens no socket: under valgrind a pass can run below the
        # full concurrency, and a pool that grows later would count handshakes as requests.
        sockets = -1
        for _ in range(WARMUP_PASSES):
            await _get_many(links, max(warmup, connections), body)
            if sockets == (sockets := _sockets(hops)):
                break
        for hop in hops:
            hop.control("-z")
        started = time.monotonic()
        await _get_many(links, requests, body)
        seconds = time.monotonic() - started
        busy = sum(hop.dump() for hop in hops)
        await asyncio.sleep(seconds)
        idle = sum(hop.dump() for hop in hops)
    finally:
        for _, writer in links:
            writer.close()
    return (busy - idle) / requests


def measure(
    port: int, hops: list[Counted], warmup: int, requests: int, connections: int = 1
) -> float:
    """Instructions per request of ``hops`` together (the processes behind ``port``)."""
    if connections > 1:
        return asyncio.run(_measure_many(port, hops, warmup, requests, connections))
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        get(conn, warmup, b"b" * 1024)
        for hop in hops:
            hop.control("-z")
        started = time.monotonic()
        get(conn, requests, b"b" * 1024)
        seconds = time.monotonic() - started
        busy = sum(hop.dump() for hop in hops)
        time.sleep(seconds)
        idle = sum(hop.dump() for hop in hops)
    finally:
        conn.close()
    return (busy - idle) / requests


def haproxy_hops(lab: Lab, name: str, tls: tuple[str, str] | None) -> tuple[int, list[Counted]]:
    """HAProxy -> HAProxy -> backend, both under callgrind: the outer one's port, and the
    two. ``tls``: the inner one's bind options and the outer one's server options."""
    outer, inner = free_port(), free_port()
    bind, server = tls or ("", "")
    cfg_in = lab.haproxy_cfg(f"{name}-in", inner, lab.backend_port, bind_opts=bind)
    cfg_out = lab.haproxy_cfg(f"{name}-out", outer, inner, server_opts=server)
    hop_in = lab.counted(f"{name}-in", "haproxy", "-f", str(cfg_in))
    hop_out = lab.counted(f"{name}-out", "haproxy", "-f", str(cfg_out))
    return outer, [hop_out, hop_in]


def spread(values: list[float], fmt: str = "10,.0f") -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{lo:{fmt}} {mid:{fmt}} {hi:{fmt}}"


def main() -> int:
    if sys.argv[1:2] == ["serve"]:
        return serve(sys.argv[2:])
    if sys.argv[1:2] == ["floor"]:
        floor(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests a round")
    parser.add_argument("--warmup", type=int, default=300, help="requests before counting")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="keep the callgrind dumps")
    parser.add_argument("--pure", action="store_true", help="the pure-Python build")
    parser.add_argument(
        "--connections", type=int, default=1, help="kept-alive connections used at once"
    )
    args = parser.parse_args()
    if min(args.requests, args.warmup, args.rounds, args.connections) < 1:
        parser.error("--requests, --warmup, --rounds and --connections must be >= 1")
    for tool in ("valgrind", "callgrind_control", "nginx", "haproxy", "taskset"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (apt-get install valgrind nginx haproxy)", file=sys.stderr)
            return 2

    def stop(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)  # through the finally below: no valgrind left behind

    signal.signal(signal.SIGTERM, stop)
    os.sched_setaffinity(0, {int(LOAD_CORE)})
    env = PURE if args.pure else {}
    print(f"meshlet build: {build_of(env)}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-mtls-"))
    tmp.chmod(0o755)  # the backend's workers run as nobody and serve the body from here
    lab = Lab(tmp)
    pki = mesh_tls.make_pki(tmp)
    me = str(Path(__file__).resolve())
    results: dict[str, list[float]] = {
        "plain": [],
        "mtls": [],
        "haproxy": [],
        "haproxy-tls": [],
        "ssl-floor": [],
    }
    started = time.monotonic()
    try:
        lab.backend()
        ports: dict[str, tuple[int, list[Counted]]] = {}
        for name in ("plain", "mtls"):
            port = free_port()
            argv = [sys.executable, me, "serve", "--port", str(port)]
            argv += ["--backend", str(lab.backend_port), "--pki", str(tmp)]
            argv += ["--mtls"] if name == "mtls" else []
            ports[name] = port, [lab.counted(name, *argv, env=env)]
        ports["haproxy"] = haproxy_hops(lab, "haproxy", None)
        ports["haproxy-tls"] = haproxy_hops(lab, "haproxy-tls", mesh_tls.haproxy_tls(pki))
        port = free_port()
        argv = [sys.executable, me, "floor", "--port", str(port), "--pki", str(tmp)]
        ports["ssl-floor"] = port, [lab.counted("ssl-floor", *argv, env=env)]
        for port, _ in ports.values():
            wait_port(port, START_TIMEOUT)
        # each meshlet variant is what it claims (HAProxy's inner TLS bind answers only TLS)
        for name in ("plain", "mtls"):
            want = pki.identity(CALLER).encode() if name == "mtls" else b""
            if (seen := peer_seen(ports[name][0])) != want:
                raise RuntimeError(f"{name}: the backend saw x-meshlet-peer {seen!r}")
        print(f"all listening after {time.monotonic() - started:.0f} s", flush=True)
        for rnd in range(1, args.rounds + 1):
            for name, (port, hops) in ports.items():
                if name == "ssl-floor":
                    per = measure_floor(port, hops, args.warmup, args.requests)
                else:
                    per = measure(port, hops, args.warmup, args.requests, args.connections)
                results[name].append(per)
                print(f"round {rnd} {name:11} {per:10,.0f} instructions/request", flush=True)
        print(
            f"\ninstructions per request, 2 hops, {args.connections} connection(s), "
            f"{args.rounds} rounds (idle subtracted)"
        )
        print(f"{'':22} {'min':>10} {'median':>10} {'max':>10}")
        for name, runs in results.items():
            print(f"{name:22} {spread(runs)}")
        for tls, plain, note in (
            ("mtls", "plain", f"goal <= {GOAL}x"),
            ("haproxy-tls", "haproxy", "(OpenSSL's per record, in C)"),
        ):
            pairs = list(zip(results[tls], results[plain], strict=True))
            print(f"{tls + ' - ' + plain:22} {spread([t - p for t, p in pairs])}   TLS's own")
            ratios = [t / p for t, p in pairs]
            print(f"{tls + ' / ' + plain:22} {spread(ratios, '10.3f')}   {note}")
        pairs = list(zip(results["ssl-floor"], results["plain"], strict=True))
        floor_ratios = [(p + f) / p for f, p in pairs]
        print(
            f"{'(plain + floor) / plain':22} {spread(floor_ratios, '10.3f')}   the best ssl allows"
        )
        print(f"took {time.monotonic() - started:.0f} s")
    finally:
        lab.stop()
        if args.keep:
            print(f"callgrind dumps kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
