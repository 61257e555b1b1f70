"""Discovery, the saved table, and app health, without a control plane."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pytest

from control_plane import ring
from control_plane.wire import (
    Ack,
    Nack,
    Registration,
    Table,
    parse_table,
    table_message,
    to_json,
)
from sidecar.control import state
from sidecar.control.discovery import Discovery, describe_close, stream_url
from sidecar.control.failover import Backoff
from sidecar.control.health import AppHealth
from sidecar.proxy.routing import Pools, TableHolder
from tests.conftest import fill

TABLE = parse_table(
    {"services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": 80}]}}, "version": 3}
)


def test_backoff_grows_jittered_and_capped() -> None:
    b = Backoff(0.1, 30.0)
    delays = [b.next() for _ in range(12)]
    for attempt, delay in enumerate(delays):
        ceiling = min(30.0, 0.1 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling
    b.reset()
    assert b.next() <= 0.1


def test_stream_urls() -> None:
    assert stream_url("http://cp:7070") == "ws://cp:7070/v1/stream"
    assert stream_url("https://cp:7070/") == "wss://cp:7070/v1/stream"


def test_a_close_says_its_code_and_reason() -> None:
    assert describe_close(4409, "owned by node n2") == (
        "the control plane refused the stream with 4409 "
        "(the instance is owned by another live stream): owned by node n2"
    )
    assert describe_close(4401, "") == (
        "the control plane refused the stream with 4401 "
        "(unauthorized: the token is missing, wrong or revoked)"
    )
    assert describe_close(1001, "control plane shutting down") == (
        "the control plane closed the stream with 1001: control plane shutting down"
    )
    assert describe_close(None, "") == "the control plane closed the stream"


def test_a_save_on_a_full_disk_keeps_the_old_table_and_no_temp_file(small_disk: Path) -> None:
    path = small_disk / "svc.table"
    state.save(path, table_message(TABLE))
    fill(small_disk)
    big = table_message(replace(TABLE, version=TABLE.version + 1, epoch="x" * 300_000))
    with pytest.raises(OSError, match="No space left"):
        state.save(path, big)
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "svc.table"]
    assert state.load(path) == TABLE


def test_a_tables_age_counts_from_when_the_control_plane_built_it(tmp_path: Path) -> None:
    """A sidecar restarted on a day-old saved table reported an age of 2 s."""
    day_old = replace(TABLE, built=time.time() - 86_400)
    path = tmp_path / "svc.table"
    state.save(path, table_message(day_old))
    holder = TableHolder(Pools())
    holder.install(state.load(path), f"saved:{path}")
    assert holder.current is not None
    assert 86_400 <= holder.current.info.age(time.time()) < 86_460
    age = holder.current.dump()["age_s"]
    assert isinstance(age, float)
    assert age >= 86_400
    holder.install(replace(TABLE, version=TABLE.version + 1), "file:x")  # no built: loaded
    assert holder.current.info.age(time.time()) < 60


def test_state_round_trip_and_corruption(tmp_path: Path) -> None:
    path = tmp_path / "dir" / "svc.table"
    state.save(path, table_message(TABLE))
    assert state.load(path) == TABLE
    raw = path.read_bytes()
    path.write_bytes(raw[:-5])  # torn
    with pytest.raises(state.StateError, match="checksum mismatch"):
        state.load(path)
    path.write_bytes(b"garbage")
    with pytest.raises(state.StateError, match="not a meshlet table file"):
        state.load(path)
    with pytest.raises(state.StateError, match="No such file"):
        state.load(tmp_path / "missing")
    assert not list(path.parent.glob(".*.tmp"))  # no temp files left behind


def test_app_health_falls_after_three_and_rises_after_one() -> None:
    changes: list[bool] = []
    health = AppHealth("http://app/healthz", changes.append)
    assert health.healthy is False  # no traffic before the app has answered once
    health.record(False, "connection refused")
    assert changes == []
    health.record(True)
    assert (health.healthy, changes) == (True, [True])
    changes.clear()
    for _ in range(2):
        health.record(False, "status 500")
    assert (health.healthy, changes) == (True, [])
    health.record(False, "status 500")
    assert (health.healthy, changes) == (False, [False])
    health.record(False, "timeout")
    assert changes == [False]
    health.record(True)
    assert (health.healthy, changes) == (True, [False, True])
    assert "healthy" in repr(health)


def discovery(tmp_path: Path, holder: TableHolder) -> Discovery:
    return Discovery(
        control_planes=["http://127.0.0.1:1"],
        token="",
        service="svc",
        registration=Registration(address="127.0.0.1", port=1),
        tables=holder,
        state_path=tmp_path / "svc.table",
    )


async def test_apply_acks_newer_tables_and_saves_them(tmp_path: Path) -> None:
    holder = TableHolder(Pools())
    d = discovery(tmp_path, holder)
    assert await d._apply(table_message(TABLE)) == Ack(3)
    assert holder.current is not None
    assert (holder.current.info.version, holder.current.info.source) == (3, "control-plane")
    assert state.load(tmp_path / "svc.table") == TABLE


async def test_a_pushed_table_keeps_what_the_one_in_force_has_of_it(tmp_path: Path) -> None:
    """Services a new version did not change are the very entries (and routes) in force."""
    holder = TableHolder(Pools())
    d = discovery(tmp_path, holder)
    await d._apply(table_message(TABLE))
    assert holder.current is not None
    before = holder.current.table.services["a"], holder.route(b"a")
    b = {"endpoints": [{"address": "10.0.0.2", "port": 80}]}
    newer = parse_table({"services": {"a": to_json(TABLE.services["a"]), "b": b}, "version": 4})
    assert await d._apply(table_message(newer)) == Ack(4)
    assert holder.current.table == newer
    assert (holder.current.table.services["a"], holder.route(b"a")) == before
    assert holder.current.table.services["a"] is before[0]
    assert holder.route(b"a") is before[1]
    # what it came in is remembered with the table it made, and used only with that table
    table, digests = d._sent
    assert table is holder.current.table
    assert set(digests) == {"a", "b"}
    holder.install(parse_table({"services": {"a": b}, "version": 5}), "file:x")
    newest = parse_table({"services": {"a": to_json(TABLE.services["a"]), "b": b}, "version": 6})
    assert await d._apply(table_message(newest)) == Ack(6)
    assert holder.current.table == newest  # "a" parsed again: the table in force had changed


@pytest.mark.parametrize(
    ("message", "version", "says"),
    [
        (table_message(Table({}, 2)), 2, "version 2 is not newer than 3"),
        (table_message(Table({}, 3)), 3, "version 3 is not newer than 3"),
        (
            json.dumps(
                {
                    "type": "table",
                    "version": 9,
                    "services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": 0}]}},
                }
            ),
            9,
            "services.a.endpoints[0].port: must be from 1 to 65535",
        ),
        (
            json.dumps(
                {
                    "type": "table",
                    "version": 10,
                    "services": {
                        "a": {
                            "policy": {"lb": "maglev", "hash_on": "path"},
                            "endpoints": [{"address": "10.0.0.1", "port": 1}],
                            "ring": ring.encode(ring.build_maglev(["x", "y"], [1, 1])),
                        }
                    },
                }
            ),
            10,
            "services.a.ring: ring names endpoint 1 of 1",
        ),
        ("{not json", 0, "not JSON"),
        ('{"type": "welcome", "instance": "x", "version": 1}', 0, "expected a table"),
    ],
)
async def test_apply_nacks_and_keeps_the_old_table(
    tmp_path: Path, message: str, version: int, says: str
) -> None:
    holder = TableHolder(Pools())
    d = discovery(tmp_path, holder)
    await d._apply(table_message(TABLE))
    answer = await d._apply(message)
    assert isinstance(answer, Nack)
    assert answer.version == version
    assert says in answer.error
    assert holder.current is not None
    assert holder.current.info.version == 3
