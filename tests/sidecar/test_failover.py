"""Which control-plane address the stream tries next and how long it waits (no sockets), and
``--control-plane``'s list, checked entry by entry."""

from __future__ import annotations

import asyncio
import random
import socket

import pytest

from sidecar.config import MAX_CONTROL_PLANES, control_plane_urls
from sidecar.control.failover import (
    MAX_ADDRESSES,
    STABLE_SESSION,
    Backoff,
    Failover,
    Replica,
    resolve,
)
from sidecar.errors import ConfigError

A, B, C = (Replica(f"http://10.0.0.{n}:7070", f"10.0.0.{n}") for n in (1, 2, 3))
NAMED = [Replica("http://cp:7070", "10.0.1.1"), Replica("http://cp:7070", "10.0.1.2")]


def failover(seed: int = 0) -> Failover:
    return Failover(Backoff(0.1, 30.0, random.Random(seed)), random.Random(seed))


def test_a_round_tries_every_address_once_in_turn_from_a_random_one() -> None:
    starts = set()
    for seed in range(40):
        f = failover(seed)
        f.begin([A, B, C])
        tried = [f.pick() for _ in range(3)]
        assert tried[0] is not None
        starts.add(tried[0])
        at = [A, B, C].index(tried[0])
        assert tried == [[A, B, C][(at + n) % 3] for n in range(3)]
        assert f.round_over
        assert f.pick() is None
    assert starts == {A, B, C}  # a fleet spreads over the replicas


def test_failures_move_on_at_once_and_a_failed_round_sleeps_the_backoff() -> None:
    f = failover()
    pauses = []
    tried = []
    for _ in range(5):  # five rounds in which nothing answers
        f.begin([A, B, C])
        while (replica := f.pick()) is not None:
            tried.append(replica)
            pauses.append(f.ended(None))
    assert len(tried) == 15
    for n, replica in enumerate(tried[1:], 1):  # always the next one, across rounds too
        assert [A, B, C].index(replica) == ([A, B, C].index(tried[n - 1]) + 1) % 3
    rounds = [pauses[n : n + 3] for n in range(0, 15, 3)]
    for n, (first, second, end) in enumerate(rounds):
        assert first == second == 0.0  # on to the next address at once
        ceiling = 0.1 * 2**n
        assert ceiling / 2 <= end <= ceiling  # a whole round failed: the backoff, growing
    assert f.statistics().backoff_attempt == 5
    assert f.failovers == 0  # no stream was welcomed anywhere


def test_a_stream_that_was_up_moves_to_the_next_address_at_once_and_resets_the_backoff() -> None:
    f = failover()
    f.begin([A, B])
    for _ in range(6):  # the backoff has grown
        assert f.pick() is not None
        f.ended(None)
        if f.round_over:
            f.begin([A, B])
    assert f.statistics().backoff_attempt == 3
    on = f.pick()
    assert on is not None
    f.welcomed(on)
    assert f.ended(STABLE_SESSION + 1) == 0.0
    assert f.statistics().backoff_attempt == 0
    assert f.round_over  # the next round is resolved afresh
    f.begin([A, B])
    nxt = f.pick()
    assert nxt is not None
    assert nxt != on
    f.welcomed(nxt)
    assert f.failovers == 1
    assert f.on == nxt


def test_a_short_lived_stream_moves_on_at_once_but_counts_in_its_round() -> None:
    f = failover()
    f.begin([A, B])
    first = f.pick()
    assert first is not None
    f.welcomed(first)
    assert f.ended(0.5) == 0.0  # up, then dropped: its replica probably died
    second = f.pick()
    assert second is not None
    assert second != first
    f.welcomed(second)
    assert 0.05 <= f.ended(0.5) <= 0.1  # both dropped at once: that was a round, back off
    assert f.failovers == 1


def test_with_one_address_a_dropped_stream_waits_the_reset_backoff() -> None:
    f = failover()
    f.begin([A])
    assert f.pick() == A
    f.welcomed(A)
    assert 0.05 <= f.ended(STABLE_SESSION) <= 0.1  # as one control plane always did
    f.begin([A])
    assert f.pick() == A
    f.welcomed(A)
    assert f.failovers == 0  # the same address again is no failover


def test_a_new_round_continues_after_the_last_address_even_when_the_answer_changes() -> None:
    f = failover(3)
    f.begin([*NAMED, C])
    while f.pick() != NAMED[0]:
        f.ended(None)
    f.ended(STABLE_SESSION)
    f.begin([C, *NAMED])  # the same addresses in another order
    assert f.pick() == NAMED[1]
    f.ended(STABLE_SESSION)
    f.begin([A, B, C])  # NAMED[1] is gone: where the next one was
    assert f.pick() in (A, B, C)
    assert f.statistics().addresses == 3


def test_a_round_with_no_address_sleeps_the_backoff() -> None:
    f = failover()
    f.begin([])
    assert f.round_over
    assert f.pick() is None
    assert 0.05 <= f.ended(None) <= 0.1
    assert 0.1 <= f.ended(None) <= 0.2


def test_repr_and_statistics_say_the_state() -> None:
    f = failover()
    f.begin([A, B])
    assert f.pick() is not None
    assert repr(f) == "<Failover [1 of 2 tried this round, 0 failovers, on none yet]>"
    f.welcomed(A)
    assert repr(f).endswith("on http://10.0.0.1:7070]>")
    stats = f.statistics()
    assert (stats.addresses, stats.tried, stats.failovers) == (2, 1, 0)
    assert str(NAMED[0]) == "http://cp:7070 at 10.0.1.1"


async def test_an_ip_address_resolves_to_itself_and_a_name_through_the_system() -> None:
    assert await resolve("https://10.1.2.3:7070/mesh") == [
        Replica("https://10.1.2.3:7070/mesh", "10.1.2.3")
    ]
    assert await resolve("http://[::1]:7070") == [Replica("http://[::1]:7070", "::1")]
    found = await resolve("http://localhost:7070")
    assert Replica("http://localhost:7070", "127.0.0.1") in found
    assert len(found) <= MAX_ADDRESSES
    with pytest.raises(socket.gaierror):
        async with asyncio.timeout(10):
            await resolve("http://no-such-host.invalid:7070")


def test_a_list_of_control_planes() -> None:
    assert control_plane_urls("") == ()
    assert control_plane_urls("http://cp:7070") == ("http://cp:7070",)
    assert control_plane_urls(" http://cp-0:7070 ,https://cp-1.example/mesh/,http://[::1]:1") == (
        "http://cp-0:7070",
        "https://cp-1.example/mesh/",
        "http://[::1]:1",
    )
    many = ",".join(f"http://cp-{n}:7070" for n in range(MAX_CONTROL_PLANES))
    assert len(control_plane_urls(many)) == MAX_CONTROL_PLANES


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("cp:7070", "URL 1 of 1, 'cp:7070', is not http://HOST:PORT or https://HOST:PORT"),
        ("http://a:1,,http://b:1", "URL 2 of 3, is empty (a stray comma?)"),
        ("http://a:1,", "URL 2 of 2, is empty (a stray comma?)"),
        ("http://a:1,ftp://b:1", "URL 2 of 2, 'ftp://b:1', is not http://HOST:PORT"),
        ("http://a:99999", "URL 1 of 1, 'http://a:99999', has a port that is not 1-65535"),
        ("http://a:0", "URL 1 of 1, 'http://a:0', has a port that is not 1-65535"),
        ("http://a:x", "URL 1 of 1, 'http://a:x', has a port that is not 1-65535"),
        ("http://:7070", "URL 1 of 1, 'http://:7070', is not http://HOST:PORT"),
        ("http://a:1/?x=1", "has a query or fragment; a control plane URL takes neither"),
        ("http://a:1#top", "has a query or fragment"),
        ("http://a:1,http://a:1", "URL 2 of 2, 'http://a:1', is listed twice"),
        ("http://me:s3cret@a:1", "URL 1 of 1, has credentials in it: give them with --token"),
        ("http://a:1\n,x", "URL 2 of 2, 'x', is not"),
        ("http://\x1b[31m:1", r"'http://\x1b[31m:1', has spaces, control or non-ASCII"),
        ("http://é.example:1", "an IDN: its xn-- form"),
        ("http://cp :1", "'http://cp :1', has spaces"),
        ("http://[::1:1", "'http://[::1:1', is not a URL: Invalid IPv6 URL"),
        ("http://me:s3cret@a:1\x00", "has credentials in it"),
        (
            ",".join(["http://a:1"] * (MAX_CONTROL_PLANES + 1)),
            f"lists {MAX_CONTROL_PLANES + 1} URLs; at most {MAX_CONTROL_PLANES}",
        ),
    ],
)
def test_a_bad_entry_is_named(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        control_plane_urls(value)
    assert refused.value.field == "control_plane"
    assert says in str(refused.value)
    assert "s3cret" not in str(refused.value)
