"""bench_proxy's HTTP/2 part (issue 16): h2c requests and unary gRPC calls, driven by h2load.

The backend is an nginx speaking h2c (prior knowledge) on the load generator's core:
``GET /`` answers bench_proxy's 1 KiB body; ``POST /meshtest.Greeter/Hello`` answers a unary
gRPC call as a gRPC server does: the request read in full (a mirror with the body, to an
empty location), then HEADERS (``content-type: application/grpc``), one length-prefixed
message (``meshtest.Answer``) and the trailer ``grpc-status: 0``. Before measuring, a real
grpcio client calls it through every target and must get that answer with status OK.
Every proxy speaks HTTP/2 both ways, one worker or thread on the proxy core:
  h2-direct    h2load -> backend
  h2-nginx     h2load -> nginx (listen http2; grpc_pass, upstream keepalive) -> backend
  h2-haproxy   h2load -> HAProxy (bind proto h2; server proto h2) -> backend
  h2-meshlet   h2load -> meshlet outbound (the service's policy protocol: http2) -> backend
Each round runs every target with each kind of request (``h2c``: GET /, ``grpc``: the unary
call) for ``seconds``: requests/s, and CPU-seconds per 1,000 requests of the proxy's
processes (/proc, as for HTTP/1). Ratios are per round; printed as median (min..max).
Goal: meshlet's CPU per unary gRPC call <= 2x HAProxy's.
"""

from __future__ import annotations

import re
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

GRPC_PATH = "/meshtest.Greeter/Hello"
CONNS = 10
"""h2load's connections"""
STREAMS = 10
"""h2load's streams in flight on each connection"""
WARMUP = 1000
"""requests of each kind to each target before measuring"""
KINDS = ("h2c", "grpc")
PROXIES = ("h2-nginx", "h2-haproxy", "h2-meshlet")
GOAL = "meshlet / haproxy grpc cpu <= 2x (issue 16)"

CpuReader = Callable[[], float]
"""CPU-seconds used so far by a target's proxy processes"""


def _string_field(number: int, text: bytes) -> bytes:
    """A protobuf length-delimited field (``text`` shorter than 128 bytes)."""
    assert len(text) < 128
    return bytes([number << 3 | 2, len(text)]) + text


ASK = _string_field(1, b"bench")
"""``meshtest.Ask{name: "bench"}`` (tests/sidecar/test_grpc.py's service)"""
ANSWER = _string_field(1, b"hello bench") + _string_field(2, b"nginx")
"""``meshtest.Answer{text: "hello bench", server: "nginx"}``"""


def grpc_message(message: bytes) -> bytes:
    """A gRPC length-prefixed message, uncompressed."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def write_files(tmp: Path) -> None:
    """The request h2load sends (``ask``) and the backend's answer (``answer``)."""
    (tmp / "ask").write_bytes(grpc_message(ASK))
    (tmp / "answer").write_bytes(grpc_message(ANSWER))


def backend_server(tmp: Path) -> str:
    """The backend's nginx server block, after its listen line. The static module refuses
    POST (405); error_page turns that into a GET of the answer, after the mirror has read the
    request body (answering first leaves frames for a stream the proxy closed: nginx's
    grpc_pass then fails the call)."""
    return (
        f"location / {{ root {tmp}; try_files /body =404; }} "
        f"location = {GRPC_PATH} {{ mirror /drop; mirror_request_body on; "
        f"root {tmp}; try_files /answer =404; error_page 405 =200 /answer; }} "
        "location = /drop { internal; return 204; } "
        f"location = /answer {{ internal; root {tmp}; etag off; types {{}} "
        "default_type application/grpc; add_trailer grpc-status 0; }"
    )


GRPC_PASS = "location / { grpc_pass grpc://backend; }"
"""nginx proxying HTTP/2 to the backend over kept HTTP/2 connections"""


@dataclass
class H2Result:
    rps: float
    requests: int
    cpu_per_1000: float | None


def h2load_argv(port: int, kind: str, tmp: Path, *load: str) -> list[str]:
    """h2load sending ``kind`` requests to ``port``; ``load``: its -c, -m, -n or -D."""
    argv = ["h2load", *load, "-H", ":authority: backend"]  # (meshlet routes by it)
    if kind == "grpc":
        argv += ["-d", str(tmp / "ask"), "-H", "content-type: application/grpc"]
        argv += ["-H", "te: trailers", f"http://127.0.0.1:{port}{GRPC_PATH}"]
    else:
        argv.append(f"http://127.0.0.1:{port}/")
    return argv


def parse_h2load(out: str) -> tuple[float, int]:
    """Requests/s and requests answered; RuntimeError when any failed."""
    found = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    counts = re.search(r"(\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout", out)
    if found is None or counts is None:
        raise RuntimeError(f"h2load said:\n{out}")
    succeeded, *failed = (int(n) for n in counts.groups())
    if any(failed) or not succeeded:
        raise RuntimeError(f"h2load saw failures:\n{out}")
    return float(found.group(1)), succeeded


def run_h2load(
    core: str, port: int, kind: str, tmp: Path, cpu: CpuReader | None, bound: str
) -> H2Result:
    """h2load on ``core``, ``bound`` by a count (-n) or seconds (-D), and the CPU per 1,000
    requests that ``cpu`` counted meanwhile."""
    before = cpu() if cpu else 0.0
    argv = [
        "taskset",
        "-c",
        core,
        *h2load_argv(port, kind, tmp, f"-c{CONNS}", f"-m{STREAMS}", bound),
    ]

    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=300).stdout
    used = cpu() - before if cpu else None
    rps, requests = parse_h2load(out)
    return H2Result(rps, requests, used / requests * 1000 if used is not None else None)


def check_grpc(port: int) -> None:
    """A real grpcio client's unary call through ``port`` gets the answer, status OK."""
    with grpc.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.default_authority", "backend")]
    ) as channel:
        answer, call = channel.unary_unary(GRPC_PATH).with_call(ASK, timeout=10)
    if answer != ANSWER or call.code() != grpc.StatusCode.OK:
        raise RuntimeError(f"port {port}: gRPC answer {answer!r}, {call.code()}")


Targets = dict[str, tuple[int, CpuReader | None]]
"""name -> (port, the proxy's CPU reader; None for the backend itself)"""
Results = dict[tuple[str, str], list[H2Result]]
"""(name, kind) -> one result a round"""


def warm_up(core: str, targets: Targets, tmp: Path) -> None:
    for port, _ in targets.values():
        check_grpc(port)
        for kind in KINDS:
            run_h2load(core, port, kind, tmp, None, f"-n{WARMUP}")


def measure(
    core: str, targets: Targets, rnd: int, seconds: float, tmp: Path, results: Results
) -> None:
    for kind in KINDS:
        for name, (port, cpu) in targets.items():
            res = run_h2load(core, port, kind, tmp, cpu, f"-D{max(1, round(seconds))}")
            results[(name, kind)].append(res)
            per_1000 = f"{res.cpu_per_1000:.3f}" if res.cpu_per_1000 is not None else "  -  "
            print(
                f"round {rnd + 1} {kind:<4} {name:<11} {res.rps:9.0f} req/s  cpu/1k {per_1000} s",
                flush=True,
            )


def ratios(results: Results, name: str, base: str, kind: str, field: str) -> list[float]:
    """``field`` of ``name`` over ``base``'s, round by round."""
    pairs = zip(results[(name, kind)], results[(base, kind)], strict=True)
    values = [(getattr(r, field), getattr(b, field)) for r, b in pairs]
    return [a / b for a, b in values if a and b]


def spread(values: list[float], unit: str = "x") -> str:
    """median (min..max)"""
    if not values:
        return "-"
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}..{max(values):.2f})"


def report(results: Results) -> None:
    names = list(dict.fromkeys(name for name, _ in results))
    rounds = len(results[(names[0], KINDS[0])])
    print(f"\nHTTP/2, h2load -c{CONNS} -m{STREAMS}: medians over {rounds} rounds")
    for kind in KINDS:
        print(f"{kind:<4} {'':11} {'req/s':>9} {'cpu/1k req':>11}")
        for name in names:
            runs = results[(name, kind)]
            cpu = [r.cpu_per_1000 for r in runs if r.cpu_per_1000 is not None]
            per_1000 = f"{statistics.median(cpu):.3f} s" if cpu else "-"
            print(f"     {name:11} {statistics.median(r.rps for r in runs):9.0f} {per_1000:>11}")
    print("ratios per round: median (min..max)")
    for kind in KINDS:
        for base in ("h2-haproxy", "h2-nginx"):
            cost = spread(ratios(results, "h2-meshlet", base, kind, "cpu_per_1000"))
            rate = spread(ratios(results, "h2-meshlet", base, kind, "rps"))
            print(f"  {kind:<4} meshlet / {base[3:]:<7}  cpu/request {cost:<22} req/s {rate}")
    print(f"goal: {GOAL}")


def new_results() -> Results:
    return defaultdict(list)
