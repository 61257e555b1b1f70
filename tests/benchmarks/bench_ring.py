"""Consistent-hash rings at N = 10, 100 and 1000 endpoints of equal weight (deterministic).

For Maglev and the hash ring: the spread of the table or ring over endpoints (max / mean share),
the keys that move when one endpoint is removed and when one is added (against the ideal 1/N),
the build time, and the sidecar's lookup per key (hash + index) against plain mod-N hashing
(``crc32(key) % N``, which moves nearly every key on any change) measured in the same run.
Goals: Maglev max/mean <= 1.01 at N = 1000; Maglev build <= 100 ms at N = 1000; lookup <= 1 us.

Run: .venv/bin/python tests/benchmarks/bench_ring.py [--keys 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib
from collections import Counter
from collections.abc import Callable

from control_plane import ring


def ids_for(n: int) -> list[str]:
    return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}-8080" for i in range(n)]


def spread(r: ring.Ring, n: int) -> float:
    """max / mean of what each endpoint owns: table slots (Maglev) or arc of the circle."""
    if r.points is None:
        counts = Counter(r.owners)
        return max(counts.values()) / (len(r.owners) / n)
    arcs = [0] * n
    previous = r.points[-1] - 2**64
    for point, owner in zip(r.points, r.owners, strict=True):
        arcs[owner] += point - previous
        previous = point
    return max(arcs) / (2**64 / n)


def moved(before: list[str], after: list[str]) -> float:
    return sum(b != a for b, a in zip(before, after, strict=True)) / len(before)


def owners(r: ring.Ring, names: list[str], hashes: list[int]) -> list[str]:
    return [names[r.lookup(h)] for h in hashes]


def timed(fn: Callable[[], object], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(algorithm: str, n: int, keys: list[bytes], hashes: list[int], rounds: int) -> str:
    names = ids_for(n + 1)
    base, extra = names[:n], names[: n + 1]
    gone = base[:3] + base[4:]
    r = ring.build(algorithm, base, [100] * n)
    build = timed(lambda: ring.build(algorithm, base, [100] * n), rounds)
    before = owners(r, base, hashes)
    removed = moved(before, owners(ring.build(algorithm, gone, [100] * (n - 1)), gone, hashes))
    added = moved(before, owners(ring.build(algorithm, extra, [100] * (n + 1)), extra, hashes))

    def lookups() -> None:
        for k in keys:
            r.lookup(ring.key_hash(k))

    def mod_n() -> None:
        for k in keys:
            zlib.crc32(k) % n

    ratios = []
    per_key = []
    for _ in range(rounds):
        ours, peer = timed(lookups, 1), timed(mod_n, 1)
        ratios.append(ours / peer)
        per_key.append(ours / len(keys))
    return (
        f"{algorithm:10} {n:>5} {len(r.owners):>7} {spread(r, n):>9.4f} "
        f"{removed:>8.4f} {added:>8.4f} {1 / n:>7.4f} {build * 1000:>9.1f} "
        f"{statistics.median(per_key) * 1e6:>10.3f} {statistics.median(ratios):>8.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    keys = [f"user-{i}".encode() for i in range(args.keys)]
    hashes = [ring.key_hash(k) for k in keys]
    print(f"{args.keys} keys; medians of {args.rounds} rounds")
    print(
        f"{'algorithm':10} {'N':>5} {'slots':>7} {'max/mean':>9} {'removed':>8} {'added':>8} "
        f"{'1/N':>7} {'build ms':>9} {'lookup us':>10} {'x mod-N':>8}"
    )
    for n in (10, 100, 1000):
        for algorithm in ring.ALGORITHMS:
            print(measure(algorithm, n, keys, hashes, args.rounds))
    print(
        "removed/added: share of keys whose owner changed when endpoint 3 left or one joined "
        "(ideal 1/N; ring_hash moves exactly the leaving endpoint's keys, except at N = 10 where "
        "the total weight crosses a step: 2 points per unit of weight below 1,024, 1 above)."
    )


if __name__ == "__main__":
    main()
