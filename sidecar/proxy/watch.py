"""What a client connection watches in time (``Watch``, the base of ``listener.Downstream``).

One lazy timer per connection watches everything time-bound on it: the request head, the
keep-alive wait, the active exchange's deadline, the silence of a stream or a tunnel, and the
pace of a request body or of a client reading its answers (``limits.MinRate``). It wakes no
later than the nearest of them and re-arms when it wakes early, so a deadline that moves
later touches no timer: most requests cost none.
"""

from __future__ import annotations

import asyncio
import enum
import math
from dataclasses import dataclass
from typing import Final

from sidecar.errors import Reason, error_response
from sidecar.http.reader import HeadReader
from sidecar.proxy.exchange import Exchange
from sidecar.proxy.tracker import ConnectionTracker
from sidecar.resilience.tries import State

#: the shortest wait between two looks of the connection's timer, in seconds
_MIN_WAKE = 0.01


@dataclass(frozen=True, slots=True)
class Timeouts:
    head: float = 10.0
    """seconds a client has to send a whole request head"""
    idle: float = 60.0
    """seconds a keep-alive client connection may sit between requests"""


class Wait(enum.Enum):
    """What a client connection's deadline is for."""

    HEAD = 0  # the client's request head
    ROUTE = 1  # the active exchange: its deadline, and its stream's silence
    IDLE = 2  # the next request on a keep-alive connection
    TUNNEL = 3  # a tunnel's silence


# The members as module constants for the hot path: on Python 3.11 each ``Wait.X`` goes
# through EnumType.__getattr__ (~0.1 us in pure Python; compiled, both are static loads)
WAIT_HEAD: Final = Wait.HEAD
WAIT_ROUTE: Final = Wait.ROUTE
WAIT_IDLE: Final = Wait.IDLE
WAIT_TUNNEL: Final = Wait.TUNNEL


class Watch(asyncio.Protocol):
    """The timer of a client connection, and the state of the connection it reads.

    ``listener.Downstream`` is the connection: it keeps these fields as it parses requests
    and runs their exchanges, and does what the watch decides (``write``, ``_close``,
    ``_reject``). A base class rather than an object of its own: ``expect`` and
    ``expect_route_at`` stay one call each (the keep-alive wait after a response takes none:
    ``Downstream.exchange_done`` sets it inline).
    """

    __slots__ = (
        "_active",
        "_body_base",
        "_body_paused",
        "_body_since",
        "_bytes_in",
        "_bytes_out",
        "_closing",
        "_current",
        "_deadline",
        "_moved_seen",
        "_pauses",
        "_quiet_since",
        "_reader",
        "_stalled_at",
        "_stalled_sent",
        "_timer",
        "_timer_at",
        "_tunnel",
        "_wait",
        "loop",
        "timeouts",
        "tracker",
        "transport",
        "write_paused",
    )

    def __init__(
        self, tracker: ConnectionTracker, timeouts: Timeouts, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.tracker = tracker
        self.timeouts = timeouts
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self._reader = HeadReader()  # the head being read, and the limits of heads and trailers
        self._current: Exchange | None = None  # the exchange being parsed
        self._active: Exchange | None = None  # the exchange talking to the upstream
        self._tunnel: Exchange | None = None
        self._pauses: set[str] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._wait = WAIT_HEAD
        self._deadline = 0.0
        self._closing = False
        self.write_paused = False  # the client is not reading: keep upstreams paused
        # bytes either way, for the silence of streams and tunnels and the data rates
        self._bytes_in = 0
        self._bytes_out = 0
        self._moved_seen = -1  # _bytes_in + _bytes_out when the timer last looked
        self._quiet_since = 0.0  # loop time the timer last saw bytes move
        self._body_since: float | None = None  # loop time a request body began (rate)
        self._body_base = 0  # _bytes_in then
        self._body_paused: float | None = None  # loop time reading was paused, mid-body
        self._stalled_at = 0.0  # loop time writes were paused (the client stopped reading)
        self._stalled_sent = 0  # bytes the client had taken then

    # -- what the connection does (``listener.Downstream``) ---------------------------------

    def write(self, data: bytes) -> None:
        raise NotImplementedError

    def _close(self, *, abort: bool) -> None:
        raise NotImplementedError

    def _reject(self, reason: Reason, detail: str) -> None:
        raise NotImplementedError

    # -- the timer ----------------------------------------------------------------------------

    def expect_route_at(self, when: float) -> None:
        """The active exchange's deadline (loop time): its route timeout or its try's."""
        self._wait = WAIT_ROUTE
        self._deadline = when
        if self._timer is not None and self._timer_at <= when:
            return  # it wakes in time (and re-arms), as ``expect`` explains
        now = self.loop.time()
        at = now + self.timeouts.head  # (min(), inline: cheaper in pure Python)
        if when < at:
            at = when
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_at(at, self._on_timer)
        self._timer_at = at

    def expect(self, wait: Wait, seconds: float) -> None:
        """From now on the connection waits for ``wait``, at most ``seconds``.

        The timer is lazy: it wakes no later than the deadline, and when it wakes early it
        re-arms. A deadline that moves later touches no timer, so most requests cost none.
        """
        now = self.loop.time()
        self._wait = wait
        self._deadline = now + seconds
        when = now + self.timeouts.head  # (min(), inline)
        if self._deadline < when:
            when = self._deadline
        if self._timer is None or when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _arm_at(self, when: float) -> None:
        """Make the timer wake no later than ``when`` (loop time)."""
        if self._closing or when == math.inf:
            return
        if self._timer is None or when < self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer)
            self._timer_at = when

    def _on_timer(self) -> None:
        self._timer = None
        if self._closing:
            return
        now = self.loop.time()
        if self._too_slow(now):
            return
        wait = self._wait
        if wait is WAIT_ROUTE or wait is WAIT_TUNNEL:
            if self._went_silent(now):
                return
            if wait is WAIT_ROUTE and now >= self._deadline and self._active is not None:
                self._active.route_timeout()  # (it sets the next deadline, or ends)
        elif now >= self._deadline:
            if wait is WAIT_HEAD:
                self._head_timeout()
            else:
                self._close(abort=False)  # idle keep-alive
            return
        if not self._closing:
            self._arm_at(max(self._next_look(now), now + _MIN_WAKE))

    def _next_look(self, now: float) -> float:
        """When the timer must look again: the nearest deadline of what it watches, and
        at most ``timeouts.head`` from now (half a silence limit, when that is shorter)."""
        at = now + self.timeouts.head
        wait = self._wait
        if wait is not WAIT_TUNNEL and now < self._deadline < at:
            at = self._deadline  # (one passed is the exchange's to move, or gone with it)
        if wait is WAIT_ROUTE or wait is WAIT_TUNNEL:
            idle = self._silence_limit(self._active if wait is WAIT_ROUTE else self._tunnel)
            if idle < math.inf:
                at = min(at, self._quiet_since + idle, now + idle / 2)
        rate = self.tracker.limits.min_rate
        if self._body_since is not None and self._body_paused is None:
            at = min(at, rate.deadline(self._body_since, self._bytes_in - self._body_base))
        if self.write_paused and self._tunnel is None:
            at = min(at, rate.deadline(self._stalled_at, self._client_took()))
        return at

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        if self._reader.in_head:
            self.write(
                error_response(
                    Reason.REQUEST_TIMEOUT, "request head not received in time", close=True
                )
            )
            self.tracker.rejected(Reason.REQUEST_TIMEOUT, self.timeouts.head)
        self._close(abort=False)

    # -- the client's pace and the silence of streams ----------------------------------------

    def _body_started(self) -> None:
        """A request body is still coming after its read: from now on it has a pace."""
        now = self.loop.time()
        self._body_since = now
        self._body_base = self._bytes_in
        self._body_paused = now if self._pauses else None
        self._arm_at(self.tracker.limits.min_rate.deadline(now, 0))

    def _client_took(self) -> int:
        """Bytes the client has read since it stopped reading (its writes were paused)."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self._bytes_out - buffered - self._stalled_sent

    def _too_slow(self, now: float) -> bool:
        """The minimum data rate, both ways: a request body that comes too slowly is
        answered 408; a client that reads its answers too slowly is cut."""
        rate = self.tracker.limits.min_rate
        counters = self.tracker.counters
        if self._body_since is not None and self._body_paused is None:
            moved = self._bytes_in - self._body_base
            if now >= rate.deadline(self._body_since, moved):
                counters.request_body_rate += 1
                detail = (
                    f"the request body came slower than {rate.bytes_per_s:g} bytes/s "
                    f"({moved} bytes in {now - self._body_since:.1f} s)"
                )
                ex = self._current
                if ex is not None and ex is self._active and ex.state is not State.RESPONDING:
                    ex.fail(Reason.REQUEST_TIMEOUT, detail)
                elif ex is not None and ex is self._active:
                    self._close(abort=True)  # too late for a 408
                else:
                    self._reject(Reason.REQUEST_TIMEOUT, detail)
                return True
        if (  # (a tunnel's client may be slow: its upstream waits, paused, until it idles)
            self.write_paused
            and self._tunnel is None
            and now >= rate.deadline(self._stalled_at, self._client_took())
        ):
            counters.response_rate += 1
            self._close(abort=True)
            return True
        return False

    def _silence_limit(self, ex: Exchange | None) -> float:
        """Seconds the stream (or tunnel) of ``ex`` may go without a byte either way."""
        if ex is None or ex.route is None:
            return math.inf
        policy = ex.route.policy
        ms = (
            policy.tunnel_idle_timeout_ms
            if ex.state is State.TUNNEL
            else policy.stream_idle_timeout_ms
        )
        return ms / 1000 if ms else math.inf

    def _went_silent(self, now: float) -> bool:
        """Nothing moved either way for the stream's (or tunnel's) idle timeout: end it."""
        moved = self._bytes_in + self._bytes_out
        if moved != self._moved_seen:
            self._moved_seen = moved
            self._quiet_since = now
            return False
        ex = self._active if self._wait is WAIT_ROUTE else self._tunnel
        idle = self._silence_limit(ex)
        if ex is None or now - self._quiet_since < idle:
            return False
        counters = self.tracker.counters
        if ex.state is State.TUNNEL:
            counters.tunnel_idle += 1
        else:
            counters.stream_idle += 1
        ex.idle_timeout(idle, client_stalled=not self._pauses)
        return True
