"""Where each balancing policy sends requests when endpoints misbehave (simulated, virtual time).

Ten endpoints of equal weight: eight answer in about 30 ms, one takes ten times as long
(about 300 ms), one answers 503 at once (about 1 ms). Requests arrive at random (Poisson,
300/s) and each goes to the endpoint the policy picks, with no retries; the sidecar's real
balancers and endpoint statistics run on a fake clock. For each policy: the share of requests
sent to the slow and to the failing endpoint, the success rate and the mean latency; the ratio
column compares each bad share with round robin's in the same run (medians over seeds).
Goal: peak_ewma sends < 5 % to each bad endpoint, against about 10 % for round_robin.

Run: .venv/bin/python tests/benchmarks/bench_balancer.py [--requests 20000] [--seeds 5]
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
from dataclasses import dataclass

from control_plane.wire import Endpoint, Policy
from sidecar.balancing import balancer
from sidecar.balancing.balancer import Member
from sidecar.balancing.ewma import EndpointStats, Exclusions
from sidecar.clock import FakeClock

ENDPOINTS = 10
SLOW, FAILING = 8, 9
POLICIES = ("round_robin", "random", "least_request", "peak_ewma")


@dataclass
class Outcome:
    slow: float
    failing: float
    success: float
    mean_latency: float


def latency_of(endpoint: int, rng: random.Random) -> float:
    if endpoint == FAILING:
        return 0.001
    base = 0.300 if endpoint == SLOW else 0.030
    return base * rng.uniform(0.8, 1.2)


def simulate(lb: str, requests: int, seed: int) -> Outcome:
    rng = random.Random(seed)
    random.seed(seed)  # the balancers draw from the module's generator
    clock, shared = FakeClock(), Exclusions()
    members = [
        Member(Endpoint("10.0.0.1", 1000 + i), EndpointStats(clock.monotonic() - 3600, shared))
        for i in range(ENDPOINTS)
    ]
    pick = balancer.make(Policy(lb=lb), members, clock).pick
    done: list[tuple[float, int, int, float]] = []  # (finish time, request, endpoint, latency)
    sent = [0] * ENDPOINTS
    ok = 0
    latencies = 0.0
    now = clock.monotonic()
    for n in range(requests):
        now += rng.expovariate(300.0)
        while done and done[0][0] <= now:
            finished, _, i, latency = heapq.heappop(done)
            clock.advance(finished - clock.monotonic())
            stats = members[i].stats
            stats.in_flight -= 1
            stats.record(clock.monotonic(), latency, failed=i == FAILING, retry_after=None)
        clock.advance(now - clock.monotonic())
        m = pick()
        assert m is not None
        i = m.endpoint.port - 1000
        sent[i] += 1
        m.stats.in_flight += 1
        latency = latency_of(i, rng)
        heapq.heappush(done, (now + latency, n, i, latency))
        ok += i != FAILING
        latencies += latency
    return Outcome(
        sent[SLOW] / requests, sent[FAILING] / requests, ok / requests, latencies / requests
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    runs = {
        lb: [simulate(lb, args.requests, seed) for seed in range(args.seeds)] for lb in POLICIES
    }
    rr = runs["round_robin"]
    print(f"{args.requests} requests x {args.seeds} seeds; medians")
    print(
        f"{'policy':14} {'to slow':>8} {'to 503':>8} {'success':>8} {'mean ms':>8} "
        f"{'slow x rr':>10} {'503 x rr':>9}"
    )
    for lb, outcomes in runs.items():

        def median(field: str, of: list[Outcome] = outcomes) -> float:
            return statistics.median(float(getattr(o, field)) for o in of)

        slow_ratio = statistics.median(o.slow / r.slow for o, r in zip(outcomes, rr, strict=True))
        fail_ratio = statistics.median(
            o.failing / r.failing for o, r in zip(outcomes, rr, strict=True)
        )
        print(
            f"{lb:14} {median('slow'):>8.2%} {median('failing'):>8.2%} "
            f"{median('success'):>8.2%} {median('mean_latency') * 1000:>8.1f} "
            f"{slow_ratio:>10.3f} {fail_ratio:>9.3f}"
        )


if __name__ == "__main__":
    main()
