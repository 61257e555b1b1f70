"""Expiry of instances that stopped heartbeating, with Eureka-style self-preservation.

An instance is *lapsed* once no heartbeat came for ``ttl`` seconds: it turns unhealthy. After
``remove_after`` seconds it is removed. When more than ``protect_percent`` % of all
instances (and at least ``PROTECT_MIN`` of them) have lapsed at once, this control plane is
more likely cut off from them than they are all dead, so nothing expires until heartbeats
recover; a lone dead instance in a healthy registry still expires normally.

Nobody can hold protection on by registering junk: an instance that never heartbeated since it
registered neither counts toward protection nor is held by it. And protection is bounded in
time: once it has held for ``--protect-max``, the registry releases the oldest held instances
a few at a time (``release``), so a control plane that really is cut off still converges.

``plan_expiry`` is a plain function over ages; ``run_reaper`` is the loop that drives it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger("meshlet.reaper")

PROTECT_MIN = 3

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True, slots=True)
class ExpiryPlan(Generic[K]):
    lapsed: tuple[K, ...]
    """past the TTL, not yet removable: unhealthy"""
    removed: tuple[K, ...]
    """past ``remove_after``: to be removed"""
    protection: bool
    """too many lapsed at once: those are held as they are"""
    late: int = 0
    """instances past the TTL, draining ones not counted"""
    counted: int = 0
    """instances the protection threshold is a share of (draining ones are not)"""
    released: tuple[K, ...] = ()
    """held by protection but let go (``release``): in ``lapsed`` or ``removed``"""


def protecting(late: int, counted: int, protect_percent: float) -> bool:
    """Whether ``late`` of ``counted`` (not draining) instances lapsing at once looks like
    this control plane's trouble rather than theirs."""
    return late >= PROTECT_MIN and late * 100 > protect_percent * counted


def plan_expiry(
    ages: Mapping[K, float],
    *,
    ttl: float,
    remove_after: float,
    protect_percent: float,
    draining: Collection[K] = (),
    unproven: Collection[K] = (),
    release: int = 0,
) -> ExpiryPlan[K]:
    """What to do with instances whose last sign of life is ``ages[key]`` seconds old.

    Draining instances are expected to go quiet, and ``unproven`` ones (never heartbeated since
    they registered) may be junk: neither counts towards protection nor is held by it. Under
    protection, the ``release`` oldest held instances are let go all the same.
    """
    counted = [key for key in ages if key not in draining and key not in unproven]
    late = [key for key in counted if ages[key] > ttl]
    protection = protecting(len(late), len(counted), protect_percent)
    held = set(late) if protection else set()
    released = sorted(held, key=ages.__getitem__, reverse=True)[:release] if held else []
    held.difference_update(released)
    lapsed = [key for key, age in ages.items() if age > ttl and key not in held]
    return ExpiryPlan(
        lapsed=tuple(key for key in lapsed if ages[key] <= remove_after),
        removed=tuple(key for key in lapsed if ages[key] > remove_after),
        protection=protection,
        late=len(late),
        counted=len(counted),
        released=tuple(released),
    )


async def run_reaper(expire: Callable[[], Awaitable[object]], interval: float) -> None:
    """Call ``expire`` every ``interval`` seconds until cancelled; a failed sweep is logged
    and the next one runs as usual."""
    while True:
        await asyncio.sleep(interval)
        try:
            await expire()
        except Exception:
            log.exception("expiry sweep failed; retrying in %.1fs", interval)
