"""Rings: deterministic, weighted, minimal disruption, and packed for the push."""

from __future__ import annotations

import array
import os
import subprocess
import sys
from collections import Counter

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from control_plane import ring
from control_plane.ring import RingError

KEYS = [ring.key_hash(f"user-{i}".encode()) for i in range(3000)]
ids_strategy = st.lists(
    st.text("abcdef0123456789-", min_size=1, max_size=12), min_size=2, max_size=12, unique=True
)


def owners(r: ring.Ring, names: list[str]) -> list[str]:
    return [names[r.lookup(h)] for h in KEYS]


def test_key_hash_is_xxh3_and_stable_across_processes() -> None:
    assert ring.key_hash(b"user-1") == 8968379626967066057  # xxh3_64: same everywhere, forever
    script = (
        "from control_plane import ring; import json; "
        "r = ring.build('maglev', ['a', 'b', 'c'], [100, 50, 100]); "
        "print(json.dumps(ring.encode(r), sort_keys=True))"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert len(outputs) == 1  # Python's hash() randomization changes nothing


@settings(max_examples=40, deadline=None)
@given(ids_strategy, st.data())
def test_ring_hash_removal_moves_only_the_removed_members_keys(
    ids: list[str], data: st.DataObject
) -> None:
    weights = data.draw(st.lists(st.integers(100, 1000), min_size=len(ids), max_size=len(ids)))
    gone = data.draw(st.integers(0, len(ids) - 1))
    # (where the total weight crosses a step of the ring's scale, every endpoint's count changes)
    assume(ring.ring_scale(sum(weights)) == ring.ring_scale(sum(weights) - weights[gone]))
    before = owners(ring.build_ring_hash(ids, weights), ids)
    rest = ids[:gone] + ids[gone + 1 :]
    after = owners(ring.build_ring_hash(rest, weights[:gone] + weights[gone + 1 :]), rest)
    for b, a in zip(before, after, strict=True):
        assert b == a or b == ids[gone]
    # and adding it back moves exactly those keys back
    assert owners(ring.build_ring_hash(ids, weights), ids) == before


def test_ring_hash_points_follow_weight_within_the_size_range() -> None:
    assert len(ring.build_ring_hash(["a"], [1]).owners) == 1024
    assert len(ring.build_ring_hash(["a", "b"], [100, 100]).owners) == 1600  # 8 per weight
    r = ring.build_ring_hash(["a", "b", "c"], [100, 200, 100])
    assert Counter(r.owners) == {0: 400, 1: 800, 2: 400}
    assert list(r.points or []) == sorted(r.points or [])
    big = ring.build_ring_hash([f"i{i}" for i in range(20)], [100] * 20)
    assert Counter(big.owners) == dict.fromkeys(range(20), 100)  # 100 per endpoint of weight 100
    huge = ring.build_ring_hash([f"i{i}" for i in range(20)], [10000] * 20)
    assert len(huge.owners) <= ring.MAX_RING_POINTS
    assert ring.ring_scale(1000) == 2  # ten endpoints of weight 100: 2,000 points
    assert ring.ring_scale(1100) == 1


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=1, max_size=20))
def test_maglev_fills_a_prime_table_in_proportion_to_weight(weights: list[int]) -> None:
    ids = [f"i{i}" for i in range(len(weights))]
    r = ring.build_maglev(ids, weights)
    size = len(r.owners)
    assert size >= 65537
    assert all(size % f for f in range(2, int(size**0.5) + 1))
    counts = Counter(r.owners)
    assert sum(counts.values()) == size
    assert set(counts) <= set(range(len(ids)))
    top = max(weights)
    for i, w in enumerate(weights):
        # each turn an endpoint fills one slot, a lighter one sits out in proportion
        expected = size * w / sum(weights)
        assert abs(counts[i] - expected) <= 1 + len(weights) * top / w, (i, counts[i], expected)


def test_maglev_at_a_thousand_endpoints() -> None:
    ids = [f"10.1.{i // 250}.{i % 250}-8080" for i in range(1000)]
    r = ring.build_maglev(ids, [100] * 1000)
    assert len(r.owners) == 131101  # 65537 doubled to a prime: >= 100 x endpoints
    counts = Counter(r.owners)
    assert max(counts.values()) / (len(r.owners) / 1000) <= 1.01


def test_maglev_removal_moves_the_removed_members_keys_and_few_others() -> None:
    ids = [f"i{i}" for i in range(20)]
    before = owners(ring.build_maglev(ids, [100] * 20), ids)
    rest = ids[:7] + ids[8:]
    after = owners(ring.build_maglev(rest, [100] * 19), rest)
    moved = [b != a for b, a in zip(before, after, strict=True)]
    assert all(m for b, m in zip(before, moved, strict=True) if b == "i7")
    others = sum(m for b, m in zip(before, moved, strict=True) if b != "i7")
    assert others / len(KEYS) < 0.05  # Maglev's extra disruption: small, not zero


@pytest.mark.parametrize("algorithm", ["maglev", "ring_hash"])
def test_encode_decode_round_trip(algorithm: str) -> None:
    r = ring.build(algorithm, ["a", "b", "c"], [100, 50, 100])
    packed = ring.encode(r)
    assert set(packed) >= {"algorithm", "owner_type", "owners"}
    assert len(packed["owners"]) < 65537  # packed, not a list of numbers
    back = ring.decode(packed, 3)
    assert back.algorithm == algorithm
    assert back.owners == r.owners
    assert back.points == r.points


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"algorithm": "rendezvous"}, "unknown ring algorithm"),
        ({"owner_type": "Q"}, "owner type"),
        ({"owners": "not base64!"}, "does not decode"),
        ({"owners": "aGVsbG8="}, "does not decode"),  # base64, not zlib
        ({"points": None}, "does not decode"),
    ],
)
def test_decode_refuses_what_does_not_fit(change: dict[str, object], message: str) -> None:
    packed = {**ring.encode(ring.build_ring_hash(["a", "b"], [1, 1])), **change}
    with pytest.raises(RingError, match=message):
        ring.decode(packed, 2)


def test_decode_refuses_a_ring_for_other_endpoints() -> None:
    packed = ring.encode(ring.build_maglev(["a", "b", "c"], [1, 1, 1]))
    with pytest.raises(RingError, match="names endpoint 2 of 2"):
        ring.decode(packed, 2)
    small = ring.encode(ring.Ring("maglev", array.array("H", [0] * 100)))
    with pytest.raises(RingError, match="not prime"):
        ring.decode(small, 1)
    hashed = ring.encode(ring.build_ring_hash(["a", "b"], [1, 1]))
    other = ring.encode(ring.build_ring_hash(["a", "b"], [1, 2]))
    with pytest.raises(RingError, match="differ in number"):
        ring.decode({**hashed, "points": other["points"]}, 2)


def test_build_refuses_nothing_to_build_over() -> None:
    for algorithm in ring.ALGORITHMS:
        with pytest.raises(RingError, match="at least one endpoint"):
            ring.build(algorithm, [], [])
    with pytest.raises(RingError, match="unknown ring algorithm"):
        ring.build("random", ["a"], [1])
    with pytest.raises(RingError, match="prime"):
        ring.build_maglev(["a"], [1], size=100)  # would never fill


def test_maglev_size_comes_in_steps_so_one_more_endpoint_keeps_it() -> None:
    assert ring.maglev_size(1) == ring.maglev_size(655) == 65537
    assert ring.maglev_size(656) == ring.maglev_size(1000) == ring.maglev_size(1311) == 131101
    assert ring.maglev_size(1312) > 262000
