"""Consistent-hash rings: Maglev lookup tables and hash rings with virtual nodes.

The control plane builds them (deterministically, from instance ids and weights, with xxHash,
never Python's ``hash()``) and pushes them packed; sidecars only look keys up, so every sidecar
maps a key to the same endpoint. The sidecar imports this module (and ``wire``, ``flags``).

``maglev``: a lookup table of prime size M (65537, doubled while under 100 x endpoints),
filled by each endpoint's own permutation in turns proportional to its weight (Eisenbud et al.
2016, with Envoy's weighting). A key's slot is ``hash % M``.

``ring_hash``: each endpoint gets ``weight x scale`` points at ``hash(id-k)`` (100 for the
default weight); a key belongs to the first point at or after its hash. ``scale`` is 1, or the
power of two that keeps the ring between ``MIN_RING_POINTS`` and ``MAX_RING_POINTS`` in all.
An endpoint's points depend on its own id and weight and on the scale only, so removing one
moves exactly its keys, except where the total weight crosses a step of the scale.
"""

from __future__ import annotations

import array
import base64
import bisect
import sys
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import xxhash

MAGLEV_SIZE = 65537
MIN_RING_POINTS = 1024
MAX_RING_POINTS = 131072
ALGORITHMS = ("ring_hash", "maglev")


def key_hash(key: bytes) -> int:
    """The 64-bit hash of a request's key, the same on every sidecar and the control plane."""
    return xxhash.xxh3_64_intdigest(key)


class RingError(ValueError):
    """A pushed ring that cannot be used."""


@dataclass(frozen=True, slots=True)
class Ring:
    """``owners[slot]`` is an index into the endpoints the ring was built over."""

    algorithm: str
    owners: array.array[int]
    points: array.array[int] | None = None
    """ring_hash: the sorted point hashes (``owners`` in the same order)"""

    def __repr__(self) -> str:
        return f"<Ring {self.algorithm} [{len(self.owners)} slots]>"

    def slot(self, h: int) -> int:
        """The slot a key hash lands in."""
        if self.points is None:
            return h % len(self.owners)
        i = bisect.bisect_left(self.points, h)
        return 0 if i == len(self.points) else i

    def lookup(self, h: int) -> int:
        return self.owners[self.slot(h)]

    def walk(self, slot: int) -> int:
        """The slot after ``slot`` (bounded loads walk on when an endpoint is full)."""
        return slot + 1 if slot + 1 < len(self.owners) else 0


def _is_prime(n: int) -> bool:
    if n < 2 or n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def maglev_size(endpoints: int) -> int:
    """65537, doubled (to the next prime) until it holds >= 100 slots per endpoint. Sizes come
    in steps, so adding or removing an endpoint keeps the size, and with it Maglev's minimal
    disruption, except where a service crosses a step (656, 1312, ... endpoints)."""
    size = MAGLEV_SIZE
    while size < 100 * endpoints:
        size *= 2
        while not _is_prime(size):
            size += 1
    return size


def build_maglev(ids: Sequence[str], weights: Sequence[int], size: int = 0) -> Ring:
    """Fill a Maglev table over ``ids`` (weights >= 1). Deterministic for the same input."""
    n = len(ids)
    if n == 0:
        raise RingError("a ring needs at least one endpoint")
    m = size or maglev_size(n)
    if not _is_prime(m):
        raise RingError(f"maglev table size {m} is not prime")
    pos = [xxhash.xxh3_64_intdigest(i.encode(), seed=1) % m for i in ids]
    skips = [xxhash.xxh3_64_intdigest(i.encode(), seed=2) % (m - 1) + 1 for i in ids]
    table = [-1] * m
    top = max(weights)
    credit = [0] * n  # each turn adds weight; a slot costs top: lighter ones fill less often
    left = m
    everyone = list(range(n))
    while True:
        for i in everyone:
            c = credit[i] + weights[i]
            if c < top:
                credit[i] = c
                continue
            credit[i] = c - top
            slot, skip = pos[i], skips[i]
            while table[slot] != -1:
                slot = (slot + skip) % m
            table[slot] = i
            pos[i] = (slot + skip) % m
            left -= 1
            if not left:
                return Ring("maglev", array.array(_owner_type(n), table))


def ring_scale(total_weight: int) -> float:
    """Points per unit of weight: 1, doubled or halved (in steps) into the ring size range."""
    scale = 1.0
    while total_weight * scale < MIN_RING_POINTS:
        scale *= 2
    while total_weight * scale > MAX_RING_POINTS:
        scale /= 2
    return scale


def build_ring_hash(ids: Sequence[str], weights: Sequence[int]) -> Ring:
    """Points at ``hash(id-k)``, sorted (ties broken by endpoint index)."""
    n = len(ids)
    if n == 0:
        raise RingError("a ring needs at least one endpoint")
    hashes: list[int] = []
    owners: list[int] = []
    digest = xxhash.xxh3_64_intdigest
    scale = ring_scale(sum(weights))
    for index, (ident, weight) in enumerate(zip(ids, weights, strict=True)):
        count = max(1, round(weight * scale))
        hashes += [digest(f"{ident}-{k}".encode()) for k in range(count)]
        owners += [index] * count
    order = sorted(range(len(hashes)), key=hashes.__getitem__)  # stable: ties by index
    return Ring(
        "ring_hash",
        array.array(_owner_type(n), [owners[j] for j in order]),
        array.array("Q", [hashes[j] for j in order]),
    )


def build(algorithm: str, ids: Sequence[str], weights: Sequence[int]) -> Ring:
    if algorithm == "maglev":
        return build_maglev(ids, weights)
    if algorithm == "ring_hash":
        return build_ring_hash(ids, weights)
    raise RingError(f"unknown ring algorithm {algorithm!r}")


# -- the packed form pushed in tables ---------------------------------------------------------


def _owner_type(endpoints: int) -> str:
    return "H" if endpoints <= 0xFFFF else "I"


def _pack(values: array.array[int]) -> str:
    if sys.byteorder == "big":  # the wire is little-endian
        values = array.array(values.typecode, values)
        values.byteswap()
    return base64.b64encode(zlib.compress(values.tobytes(), 6)).decode("ascii")


def _unpack(typecode: str, data: str) -> array.array[int]:
    values = array.array(typecode)
    values.frombytes(zlib.decompress(base64.b64decode(data, validate=True)))
    if sys.byteorder == "big":
        values.byteswap()
    return values


def encode(ring: Ring) -> dict[str, Any]:
    """A ring as JSON: owner indexes (and ring points) as base64 of zlib of little-endian
    arrays, not a JSON list of 65,537 numbers."""
    out: dict[str, Any] = {
        "algorithm": ring.algorithm,
        "owner_type": ring.owners.typecode,
        "owners": _pack(ring.owners),
    }
    if ring.points is not None:
        out["points"] = _pack(ring.points)
    return out


def decode(data: dict[str, Any], endpoints: int) -> Ring:
    """The ring a table carries for a service with ``endpoints`` endpoints; RingError if it
    does not fit them."""
    try:
        algorithm = data["algorithm"]
        typecode = data["owner_type"]
        if algorithm not in ALGORITHMS or typecode not in ("H", "I"):
            raise RingError(f"unknown ring algorithm {algorithm!r} or owner type {typecode!r}")
        owners = _unpack(typecode, data["owners"])
        points = _unpack("Q", data["points"]) if algorithm == "ring_hash" else None
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise RingError(f"ring does not decode: {e}") from None
    if not owners or (points is not None and len(points) != len(owners)):
        raise RingError("ring is empty or its points and owners differ in number")
    if max(owners) >= endpoints:
        raise RingError(f"ring names endpoint {max(owners)} of {endpoints}")
    if algorithm == "maglev" and not _is_prime(len(owners)):
        raise RingError(f"maglev table size {len(owners)} is not prime")
    return Ring(algorithm, owners, points)
