"""Which control-plane replica the push stream tries next, and how long it waits first.

``--control-plane`` lists one or more URLs; a URL whose host name resolves to several
addresses stands for each of them (a headless Kubernetes Service, DNS round robin). A *round*
is those addresses, resolved afresh when it starts (``resolve``), each URL's in address order.
The stream tries them in turn, continuing after the last one it tried (the first round starts
at a random one, so that a fleet of sidecars spreads over the replicas):

1. A try that fails to connect, is refused, or whose stream drops moves on to the next address
   at once, while the round has addresses it has not tried: a replica that died costs its
   sidecars one connect, not a backoff.
2. A round that ends without a stable stream waits the jittered exponential backoff (``Backoff``)
   before the next round: a control plane that is wholly down is never hammered.
3. A stream that was up for ``STABLE_SESSION`` seconds resets the backoff and ends the round:
   the next round (resolved again) starts at once with the next address. With one address there
   is no next: it waits the (reset) backoff, as a sidecar with one control plane always has.

``Failover`` decides all of this without I/O or a clock: ``Discovery`` tells it what happened
and sleeps what it says.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

STABLE_SESSION: Final = 5.0
"""seconds a stream must have been up to reset the backoff (not merely a welcome: a control
plane that closes every stream at once would otherwise be retried every 0.1 s)"""
MAX_ADDRESSES: Final = 16
"""addresses taken from one host name's answer (the first, in address order)"""


class Backoff:
    """Jittered exponential backoff: ``base`` doubling up to ``cap``, each a random 50-100 %."""

    def __init__(
        self, base: float = 0.1, cap: float = 30.0, rng: random.Random | None = None
    ) -> None:
        self.base = base
        self.cap = cap
        self.attempt = 0
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"<Backoff attempt {self.attempt}, {self.base:g}s doubling to {self.cap:g}s>"

    def next(self) -> float:
        delay = min(self.cap, self.base * 2.0**self.attempt)
        self.attempt = min(self.attempt + 1, 30)
        return delay * self._rng.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0


@dataclass(frozen=True, slots=True)
class Replica:
    """One address to try: a configured control-plane ``url`` and an ``address`` its host
    resolved to (the URL's host itself when it is an IP address)."""

    url: str
    address: str

    def __str__(self) -> str:
        host = urlsplit(self.url).hostname
        return self.url if host == self.address else f"{self.url} at {self.address}"


@dataclass(frozen=True, slots=True)
class FailoverStatistics:
    addresses: int
    """in the current round"""
    tried: int
    """tries in the current round"""
    failovers: int
    """streams welcomed by another address than the stream before"""
    backoff_attempt: int


class Failover:
    """The rotation over the control plane's addresses and the pause before each try."""

    def __init__(self, backoff: Backoff | None = None, rng: random.Random | None = None) -> None:
        self._backoff = backoff or Backoff()
        self._rng = rng or random.Random()
        self._round: tuple[Replica, ...] = ()
        self._next = 0
        """index in ``_round`` of the next try"""
        self._tried = 0
        self._last: Replica | None = None
        """the address tried last"""
        self.on: Replica | None = None
        """the address that welcomed the last stream (it may have ended since)"""
        self.failovers = 0

    def __repr__(self) -> str:
        return (
            f"<Failover [{self._tried} of {len(self._round)} tried this round, "
            f"{self.failovers} failovers, on {self.on or 'none yet'}]>"
        )

    def statistics(self) -> FailoverStatistics:
        return FailoverStatistics(
            len(self._round), self._tried, self.failovers, self._backoff.attempt
        )

    @property
    def round_over(self) -> bool:
        """Every address of the round was tried: ``begin`` the next (with fresh addresses)."""
        return self._tried >= len(self._round)

    def begin(self, replicas: Sequence[Replica]) -> None:
        """A new round over ``replicas``, from the one after the address tried last."""
        self._round, self._tried = tuple(replicas), 0
        if not replicas:
            return
        if self._last is None:
            self._next = self._rng.randrange(len(replicas))
        elif self._last in self._round:
            self._next = (self._round.index(self._last) + 1) % len(self._round)
        else:  # it is gone from the answer: the one now where the next one was
            self._next %= len(self._round)

    def pick(self) -> Replica | None:
        """The address to try now; None when the round is over (or had none)."""
        if self.round_over:
            return None
        replica = self._round[self._next]
        self._next = (self._next + 1) % len(self._round)
        self._tried += 1
        self._last = replica
        return replica

    def welcomed(self, replica: Replica) -> None:
        """A stream to ``replica`` was welcomed: a failover if the one before was elsewhere."""
        if self.on is not None and replica != self.on:
            self.failovers += 1
        self.on = replica

    def ended(self, up_for: float | None) -> float:
        """A try ended (``up_for``: seconds its stream was up after the welcome, None if it
        never was): seconds to wait before the next try."""
        if up_for is not None and up_for >= STABLE_SESSION:
            self._backoff.reset()
            self._tried = len(self._round)  # the next try starts a round, resolved afresh
            return 0.0 if len(self._round) > 1 else self._backoff.next()
        if self.round_over:
            return self._backoff.next()
        return 0.0


async def resolve(url: str) -> list[Replica]:
    """The addresses ``url``'s host stands for (itself if it is an IP address), in address
    order, at most ``MAX_ADDRESSES``. An unknown name raises OSError (socket.gaierror)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return [Replica(url, host)]
    port = parts.port or (443 if parts.scheme == "https" else 80)
    answers = await asyncio.get_running_loop().getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )
    addresses = sorted({str(sockaddr[0]) for *_, sockaddr in answers}, key=_address_order)
    return [Replica(url, address) for address in addresses[:MAX_ADDRESSES]]


def _address_order(address: str) -> tuple[int, int]:
    """IPv4 before IPv6, then numerically (a stable order, whatever order DNS answers in)."""
    ip = ipaddress.ip_address(address.partition("%")[0])
    return ip.version, int(ip)
