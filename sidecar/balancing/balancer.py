"""Choosing an endpoint for a request: every policy of the policy document.

``pick`` is plain synchronous code on the hot path; it never blocks and never awaits. Every
policy honours weights, slow start (an endpoint's weight ramps from 10 % to 100 % over
``slow_start_ms`` from when this sidecar first saw it routable, unless it came with the first
ones) and ``Retry-After`` (an endpoint that asked for a pause is skipped while another is
available).

    round_robin    smooth weighted round robin (nginx): exact shares, interleaved
    random         weighted random
    least_request  power of two choices on in flight + 1
    peak_ewma      power of two choices on latency x (in flight + 1), where latency is the
                   peak EWMA plus a decaying penalty for each failure (``ewma``); an endpoint
                   not measured yet takes its rival's latency, so newcomers get tried
                   With unequal weights (or while one is in slow start), both pick at random
                   in proportion to w / (latency x (in flight / w + 1)), w the weight over
                   the mean weight: shares follow the weights both when idle and under
                   steady load (in flight grows with share), and move away from latency.
                   (Two choices on cost / weight would starve a lighter or slow-starting
                   endpoint whenever nothing is in flight; Envoy's weight / (in flight + 1)
                   drifts to sqrt(weight) shares under load.)
    ring_hash,     the control plane's ring maps the request's key to an endpoint; bounded
    maglev         loads (Mirrokni et al.): none takes more than ceil(``hash_balance_factor`` x
                   its weighted share of what is in flight), the rest walks on round the ring (so
                   an endpoint in slow start spills what it cannot take yet). A request
                   without the key is balanced by peak_ewma.

Zone awareness (Envoy's algorithm, not for the hash policies): with ``zone_aware`` and at
least ``MIN_ZONE_CLUSTER`` endpoints, requests stay in this sidecar's zone if the zone holds at
least its callers' share of the endpoints; otherwise only that share of them does and the rest
spreads over the other zones.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from control_plane.ring import Ring, key_hash
from control_plane.wire import Endpoint, Policy
from sidecar.balancing.ewma import EndpointStats, Exclusions
from sidecar.clock import Clock

MIN_ZONE_CLUSTER = 6
SLOW_START_GRACE = 1.0
"""seconds: endpoints first seen within this of the earliest one do not slow-start"""


class Member:
    """An endpoint among a balancer's, with what is known of it."""

    __slots__ = ("endpoint", "pool", "stats")

    def __init__(self, endpoint: Endpoint, stats: EndpointStats) -> None:
        self.endpoint = endpoint
        self.stats = stats
        #: the proxy's, not looked at here: the endpoint's connection pool, kept on the
        #: member once a try found it (as a Tower balancer's endpoints are its services)
        self.pool: object = None

    def __repr__(self) -> str:
        return f"Member({self.endpoint!r})"


@dataclass(frozen=True, slots=True)
class Locality:
    """This sidecar's zone, and the share of its own service's endpoints in that zone (the
    callers' share); None when unknown."""

    zone: str = ""
    callers_share: float | None = None


class Balancer(Protocol):
    members: list[Member]

    def pick(self, key: bytes | None = None, avoid: tuple[Endpoint, ...] = ()) -> Member | None:
        """A member for the next try (``key``: the request's hash key; ``avoid``: the
        endpoints this request's earlier tries failed on, skipped while another is
        admissible), or None when there is none."""
        ...

    def slow_start(self, now: float) -> list[float]:
        """Each member's share of its weight now: below 1.0 while it ramps up."""
        ...


class _Members:
    """What every policy shares: the members, their effective weights, availability, zone."""

    def __init__(
        self,
        members: Sequence[Member],
        policy: Policy,
        clock: Clock,
        locality: Locality = Locality(),
    ) -> None:
        self.members = list(members)
        self.clock = clock
        # the members' endpoints are one sidecar's: their stats share its Exclusions
        self._exclusions = self.members[0].stats.exclusions if self.members else Exclusions()
        self.weights = [m.endpoint.weight for m in self.members]
        self.window = policy.slow_start_ms / 1000
        self._panic = policy.panic_threshold
        since = [m.stats.since for m in self.members]
        #: endpoints seen together with the first (a sidecar's start, a new service) do not
        #: ramp: slow start is relative to endpoints already taking traffic (as in Envoy)
        self._settled = min(since, default=0.0) + SLOW_START_GRACE
        ramping = [t for t in since if t > self._settled]
        self._ramp_end = max(ramping) + self.window if ramping else 0.0
        self._all = list(range(len(self.members)))
        self._local: list[int] = []
        self._remote: list[int] = []
        self._p_local = 0.0
        if policy.zone_aware and not policy.hashes:
            self._zones(locality)
        self._prepare()

    def _prepare(self) -> None:
        """A policy's own state, once the members are known."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} [{len(self.members)} endpoints]>"

    def _zones(self, locality: Locality) -> None:
        if not locality.zone or len(self.members) < MIN_ZONE_CLUSTER:
            return
        local = [i for i in self._all if self.members[i].endpoint.zone == locality.zone]
        if not local or len(local) == len(self.members):
            return
        upstream_share = sum(self.weights[i] for i in local) / sum(self.weights)
        callers = locality.callers_share
        self._local = local
        in_zone = set(local)
        self._remote = [i for i in self._all if i not in in_zone]
        self._p_local = (
            1.0 if callers is None or upstream_share >= callers else upstream_share / callers
        )

    def zone_pool(self) -> list[int]:
        """The members this pick chooses among by zone."""
        if self._local:
            return self._local if random.random() < self._p_local else self._remote
        return self._all

    def candidates(self, avoid: tuple[Endpoint, ...], now: float) -> list[int]:
        """The zone's choice, narrowed to the available (unless fewer than ``panic_threshold``
        % are: then all of them), then to those not in ``avoid`` (unless none is left)."""
        pool = self.zone_pool()
        if not avoid and now >= self._exclusions.until and not self._exclusions.probing:
            return pool  # nobody asked for a pause: all are available
        return self._narrowed(pool, avoid, now)

    def _narrowed(self, pool: list[int], avoid: tuple[Endpoint, ...], now: float) -> list[int]:
        # (apart from ``candidates``: a comprehension makes CPython 3.11 build closure cells
        # at each call of the function holding it, taken or not)
        members = self.members
        ready = [i for i in pool if members[i].stats.excluded_until <= now]
        if len(ready) * 100 < self._panic * len(pool) or not ready:
            ready = pool  # panic: too few are available, balance over all of them
        if avoid and len(ready) > 1:
            ready = [i for i in ready if members[i].endpoint not in avoid] or ready
        return ready

    def slow_start(self, now: float) -> list[float]:
        return [self.weight(i, now) / w if w else 1.0 for i, w in enumerate(self.weights)]

    def weights_at(self, pool: list[int], now: float) -> list[float]:
        """The weights of the members ``pool`` names, slow start applied."""
        return [self.weight(i, now) for i in pool]

    def weight(self, i: int, now: float) -> float:
        if now < self._ramp_end:
            stats = self.members[i].stats
            if stats.since > self._settled:
                return self.weights[i] * stats.slow_start(now, self.window)
        return self.weights[i]


class RoundRobin(_Members):
    """Smooth weighted round robin: over any run of sum(weights) picks each member is picked
    exactly ``weight`` times, interleaved rather than in bursts."""

    def _prepare(self) -> None:
        self._current = [0.0] * len(self.members)

    def pick(self, key: bytes | None = None, avoid: tuple[Endpoint, ...] = ()) -> Member | None:
        members = self.members
        if len(members) < 2:
            return members[0] if members else None
        now = self.clock.monotonic()
        pool = self.candidates(avoid, now)
        current = self._current
        weights = self.weights if now >= self._ramp_end else self.weights_at(self._all, now)
        best = pool[0]
        total = 0.0
        for i in pool:
            w = weights[i]
            current[i] += w
            total += w
            if current[i] > current[best]:
                best = i
        current[best] -= total
        return members[best]


class WeightedRandom(_Members):
    def pick(self, key: bytes | None = None, avoid: tuple[Endpoint, ...] = ()) -> Member | None:
        if not self.members:
            return None
        now = self.clock.monotonic()
        pool = self.candidates(avoid, now)
        return self.members[random.choices(pool, self.weights_at(pool, now))[0]]


class LeastRequest(_Members):
    """Power of two choices on load; with unequal weights, a weighted choice on weight/cost."""

    def _prepare(self) -> None:
        self._equal = len(set(self.weights)) <= 1
        self._mean_weight = sum(self.weights) / len(self.weights) if self.weights else 1.0

    def _latency(self, m: Member, now: float) -> float:
        return 1.0

    def pick(self, key: bytes | None = None, avoid: tuple[Endpoint, ...] = ()) -> Member | None:
        members = self.members
        if not members:
            return None
        now = self.clock.monotonic()
        if self._equal and now >= self._ramp_end:
            pool = self.zone_pool()
            n = len(pool)
            if n > 1:  # the usual case first: two at random, both fit to take the request
                x = int(random.random() * n)
                y = int(random.random() * (n - 1))
                a, b = members[pool[x]], members[pool[y + 1 if y >= x else y]]
                if (
                    (not avoid or (a.endpoint not in avoid and b.endpoint not in avoid))
                    and a.stats.excluded_until <= now
                    and b.stats.excluded_until <= now
                ):
                    return self._better(a, b, now)
        pool = self.candidates(avoid, now)
        if len(pool) == 1:
            return members[pool[0]]
        if self._equal and now >= self._ramp_end:
            x, y = random.sample(pool, 2)
            return self._better(members[x], members[y], now)
        return self._weighted(pool, now)

    def _weighted(self, pool: list[int], now: float) -> Member:
        """A weighted choice on weight / cost (apart from ``pick``: see ``_narrowed``)."""
        members = self.members
        latencies = [self._latency(members[i], now) for i in pool]
        measured = [t for i, t in zip(pool, latencies, strict=True) if members[i].stats.tries]
        guess = min(measured, default=1.0)
        scores = []
        for i, t in zip(pool, latencies, strict=True):
            w = self.weight(i, now) / self._mean_weight
            latency = t if members[i].stats.tries else guess
            scores.append(w * w / (latency * (members[i].stats.in_flight + w)))
        return members[random.choices(pool, scores)[0]]

    def _better(self, a: Member, b: Member, now: float) -> Member:
        """Of two, the lower latency x (in flight + 1); a newcomer takes its rival's latency."""
        la, lb = self._latency(a, now), self._latency(b, now)
        if not a.stats.tries:
            la = lb
        elif not b.stats.tries:
            lb = la
        ca = la * (a.stats.in_flight + 1)
        cb = lb * (b.stats.in_flight + 1)
        return a if ca < cb or (ca == cb and random.random() < 0.5) else b


class PeakEwma(LeastRequest):
    """Power of two choices by expected latency: peak EWMA (plus failure penalty) x load."""

    def _latency(self, m: Member, now: float) -> float:
        return m.stats.latency(now)


class HashRing(_Members):
    """The control plane's ring, with bounded loads; keyless requests go by peak EWMA."""

    def __init__(
        self,
        members: Sequence[Member],
        policy: Policy,
        clock: Clock,
        ring: Ring,
        index: Sequence[int],
    ) -> None:
        super().__init__(members, policy, clock, Locality())
        self.ring = ring
        #: ring owners index the service's whole endpoint list; this maps them to members
        self.index = index
        self.factor = policy.hash_balance_factor
        self._total_weight = sum(self.weights)
        self.fallback = PeakEwma(members, policy, clock, Locality())

    def pick(self, key: bytes | None = None, avoid: tuple[Endpoint, ...] = ()) -> Member | None:
        if key is None or not self.members:
            return self.fallback.pick(None, avoid)
        members, ring, index = self.members, self.ring, self.index
        now = self.clock.monotonic()
        load: tuple[float, float] | None = None  # (c x (in flight + 1), total weight)
        slot = ring.slot(key_hash(key))
        spare: int | None = None  # available, but full: if every endpoint is
        first: int | None = None  # not one to avoid: if none is available
        tried: set[int] = set()
        for _ in range(len(ring.owners)):
            i = index[ring.owners[slot]]
            if i >= 0 and i not in tried:
                tried.add(i)
                m = members[i]
                if m.endpoint not in avoid:
                    if m.stats.available(now):
                        if not m.stats.in_flight:
                            return m  # an idle endpoint always has room
                        if load is None:
                            load = self._load(now)
                        if m.stats.in_flight < math.ceil(load[0] * self.weight(i, now) / load[1]):
                            return m
                        if spare is None:
                            spare = i
                    elif first is None:
                        first = i
                if len(tried) == len(members):
                    break
            slot = ring.walk(slot)
        chosen = spare if spare is not None else first
        return members[chosen if chosen is not None else 0]

    def _load(self, now: float) -> tuple[float, float]:
        """(c x (in flight + 1), total weight): an endpoint's capacity is its weight's share
        of the first. O(endpoints), so only when the key's endpoint is busy."""
        members = self.members
        weight = (
            self._total_weight
            if now >= self._ramp_end
            else sum(self.weight(i, now) for i in range(len(members)))
        )
        in_flight = sum(m.stats.in_flight for m in members) + 1
        return self.factor * in_flight, weight


POLICIES: dict[str, type[_Members]] = {
    "round_robin": RoundRobin,
    "random": WeightedRandom,
    "least_request": LeastRequest,
    "peak_ewma": PeakEwma,
}


def make(
    policy: Policy,
    members: Sequence[Member],
    clock: Clock,
    locality: Locality = Locality(),
    ring: Ring | None = None,
    index: Sequence[int] = (),
) -> Balancer:
    """The balancer a service's policy asks for (a hash policy without a ring: peak_ewma)."""
    if policy.hashes and ring is not None:
        return HashRing(members, policy, clock, ring, index)
    cls = POLICIES.get(policy.lb, PeakEwma)
    balancer: Balancer = cls(members, policy, clock, locality)  # type: ignore[assignment]
    return balancer
