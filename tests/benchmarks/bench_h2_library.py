"""Where the HTTP/2 libraries' share of a unary gRPC call through the sidecar goes (issue 16):
instructions per exchange, counted by callgrind, of each piece the ``h2``, ``hpack`` and
``hyperframe`` libraries do for it, outside the sidecar (callgrind sees the interpreter's C
functions, not which Python function runs: bench_instructions_h2's dumps cannot say this).

One exchange is what the sidecar's two codecs do for a unary call: the client's connection
(``h2conn.server_config``) takes the request (HEADERS, DATA) and sends the answer (HEADERS,
DATA, trailers); the upstream's (``h2upstream.client_config``) sends the request and takes the
answer. The bytes each takes are made by peer codecs before counting. Pieces:
  h2         both codecs, everything (hpack and hyperframe included)
  h2-ours    the same, each codec on ``hpackcodec`` (``install``) as the sidecar runs it
  decode     hpack decoding of the three blocks taken (``raw``, as h2 asks); encode: of the
             three sent
  decode-ours, encode-ours: the same blocks by ``hpackcodec`` (compiled when the sidecar is)
  parse      hyperframe parsing of the five frames taken; serialize: of five frames
  repr       the ``repr`` of each frame taken (h2 makes it for a trace call, logged or not)
Each piece runs in a process of its own under ``valgrind --tool=callgrind``, ``--exchanges``
times, and is printed as (its instructions - those of the same process doing nothing but
the set-up) / exchanges. ``hpack-logs`` is the decode and encode with hpack's loggers left
enabled (as they were before ``http2`` disabled them) less without: what disabling saves,
not what the calls cost (hpack makes about 60 an exchange, each still a ``Logger.debug`` and
an ``isEnabledFor`` call, about 2k instructions, disabled).

Run: .venv/bin/python tests/benchmarks/bench_h2_library.py [--exchanges 400]
Takes about 2 minutes.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a script (and as callgrind's child)

from h2.config import H2Configuration  # noqa: E402
from h2.connection import H2Connection  # noqa: E402
from hpack import Decoder, Encoder  # noqa: E402
from hyperframe.frame import Frame  # noqa: E402

from sidecar.http import hpackcodec, http2  # noqa: E402
from sidecar.proxy.h2conn import server_config  # noqa: E402
from sidecar.proxy.h2upstream import client_config  # noqa: E402

Fields = list[tuple[bytes, bytes]]
#: what h2load sends (bench_instructions_h2), what the sidecar sends on, and the answer
REQUEST: Fields = [(b":method", b"POST"), (b":scheme", b"http"),
                   (b":authority", b"127.0.0.1:40000"), (b":path", b"/meshtest.Greeter/Hello"),
                   (b"user-agent", b"h2load nghttp2/1.52.0"),
                   (b"content-type", b"application/grpc"), (b"te", b"trailers")]  # fmt: skip
UPSTREAM: Fields = [*REQUEST, (b"x-request-id", b"0123456789abcdef0123456789abcdef"),
                    (b"grpc-timeout", b"9999m")]  # fmt: skip
RESPONSE: Fields = [(b":status", b"200"), (b"server", b"nginx/1.22.1"),
                    (b"date", b"Mon, 30 Nov 2026 05:20:00 GMT"),
                    (b"content-type", b"application/grpc")]  # fmt: skip
TRAILERS: Fields = [(b"grpc-status", b"0")]
ASK = b"\x00\x00\x00\x00\x07\n\x05bench"
ANSWER = b"\x00\x00\x00\x00\x0c\n\nhello bench"
PIECES = ("none", "h2", "h2-ours", "decode", "encode", "decode-ours", "encode-ours", "parse",
          "serialize", "repr")  # fmt: skip
#: what the derived pieces below do not take apart
OURS = ("h2-ours", "decode-ours", "encode-ours")


def peer(client_side: bool) -> H2Connection:
    conn = H2Connection(H2Configuration(client_side=client_side, header_encoding=None))
    conn.initiate_connection()
    return conn


def wire(n: int) -> tuple[list[bytes], list[bytes]]:
    """What the client sends the sidecar, and what the server answers it, ``n`` calls."""
    client, server, caller = peer(True), peer(False), peer(True)
    down, up = [client.data_to_send()], [server.data_to_send()]
    server.receive_data(caller.data_to_send())
    for sid in range(1, 2 * n, 2):
        client.send_headers(sid, REQUEST)
        client.send_data(sid, ASK, end_stream=True)
        down.append(client.data_to_send())
        caller.send_headers(sid, UPSTREAM)
        caller.send_data(sid, ASK, end_stream=True)
        server.receive_data(caller.data_to_send())
        server.send_headers(sid, RESPONSE)
        server.send_data(sid, ANSWER)
        server.send_headers(sid, TRAILERS, end_stream=True)
        up.append(server.data_to_send())
    return down, up


def codecs(down: list[bytes], up: list[bytes], ours: bool) -> None:
    inbound, outbound = H2Connection(server_config()), H2Connection(client_config())
    if ours:
        hpackcodec.install(inbound)
        hpackcodec.install(outbound)
    for conn, preface in ((inbound, down[0]), (outbound, up[0])):
        conn.initiate_connection()
        conn.receive_data(preface)
        conn.data_to_send()
    for i, sid in enumerate(range(1, 2 * len(down) - 1, 2)):
        inbound.receive_data(down[i + 1])
        outbound.send_headers(sid, UPSTREAM)
        outbound.send_data(sid, ASK, end_stream=True)
        outbound.data_to_send()
        outbound.receive_data(up[i + 1])
        outbound.acknowledge_received_data(len(ANSWER), sid)
        inbound.acknowledge_received_data(len(ASK), sid)
        inbound.send_headers(sid, RESPONSE)
        inbound.send_data(sid, ANSWER)
        inbound.send_headers(sid, TRAILERS, end_stream=True)
        inbound.data_to_send()


def frames(chunks: list[bytes]) -> list[tuple[memoryview, memoryview]]:
    out = []
    for chunk in chunks:
        view, at = memoryview(chunk), 0
        while at < len(chunk):
            _, length = Frame.parse_frame_header(view[at : at + 9])
            out.append((view[at : at + 9], view[at + 9 : at + 9 + length]))
            at += 9 + length
    return out


def run(piece: str, n: int) -> None:
    """One piece, ``n`` times, after the set-up every piece has."""
    down, up = wire(n)
    taken = frames(down[1:] + up[1:])
    requests = Encoder()
    answers = Encoder()
    blocks = [(requests.encode(REQUEST), answers.encode(RESPONSE), answers.encode(TRAILERS))
              for _ in range(n)]  # fmt: skip
    if piece in ("h2", "h2-ours"):
        codecs(down, up, piece == "h2-ours")
    elif piece in ("decode", "decode-ours"):
        decoder = hpackcodec.Decoder if piece == "decode-ours" else Decoder
        takes_requests, takes_answers = decoder(), decoder()
        for request, response, trailers in blocks:
            takes_requests.decode(request, raw=True)
            takes_answers.decode(response, raw=True)
            takes_answers.decode(trailers, raw=True)
    elif piece in ("encode", "encode-ours"):
        encoder = hpackcodec.Encoder if piece == "encode-ours" else Encoder
        sends_answers, sends_requests = encoder(), encoder()
        for _ in range(n):
            sends_answers.encode(RESPONSE)
            sends_answers.encode(TRAILERS)
            sends_requests.encode(UPSTREAM)
    elif piece in ("parse", "serialize", "repr"):
        for head, body in taken:
            frame, _ = Frame.parse_frame_header(head)
            frame.parse_body(body)
            if piece == "serialize":
                frame.serialize()
            elif piece == "repr":
                repr(frame)


def count(piece: str, n: int, logs: bool) -> int:
    argv = [sys.executable, __file__, "--piece", piece, f"--exchanges={n}"]
    argv += ["--hpack-logs"] if logs else []
    tool = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    err = subprocess.run(tool + argv, capture_output=True, text=True, check=True).stderr
    found = re.search(r"refs:\s+([\d,]+)", err)
    assert found is not None, err
    return int(found.group(1).replace(",", ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--exchanges", type=int, default=400)
    parser.add_argument("--piece", choices=PIECES, help="(callgrind's child: run one piece)")
    parser.add_argument("--hpack-logs", action="store_true", help="(child: hpack logs enabled)")
    args = parser.parse_args()
    if args.piece is not None:
        if args.hpack_logs:
            for name in http2.HPACK_LOGGERS:
                logging.getLogger(name).disabled = False
        run(args.piece, args.exchanges)
        return 0
    n = args.exchanges
    count("none", 1, False)  # (not counted: a first run may write the modules' .pyc files)
    base = count("none", n, False)
    costs = {p: (count(p, n, False) - base) / n for p in PIECES[1:]}
    ours = {p: costs.pop(p) for p in OURS}
    base_logged = count("none", n, True)  # (the set-up encodes too)
    logged = sum((count(p, n, True) - base_logged) / n for p in ("decode", "encode"))
    costs["hpack-logs"] = logged - costs["decode"] - costs["encode"]
    parse, rest = costs["parse"], costs["h2"] - costs["decode"] - costs["encode"]
    costs["repr"] -= parse  # (each repr piece parsed its frames first)
    costs["serialize"] -= parse
    costs["h2 state, events"] = rest - parse - costs["serialize"] - costs["repr"]
    print(f"instructions per unary gRPC exchange, {n} exchanges (callgrind)")
    for piece, cost in costs.items():
        print(f"  {piece:18} {cost:10,.0f}  {100 * cost / costs['h2']:5.1f} % of h2")
    print(f"hpackcodec ({Path(hpackcodec.__file__).name}) in place of hpack")
    for piece, cost in ours.items():
        was = costs[piece.removesuffix("-ours")]
        print(f"  {piece:18} {cost:10,.0f}  {100 * cost / was:5.1f} % of {piece[:-5]}'s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
