"""Who may register again, change or remove an existing instance, as a plain function."""

from __future__ import annotations

import pytest

from control_plane.access import ADMIN, JOIN, OPEN, Principal, Role
from control_plane.model import InstanceRecord, Origin
from control_plane.ownership import Claimant, changes, refusal
from control_plane.wire import Registration

CATALOG = Principal(Role.SERVICE, "catalog", "t1")
CATALOG_2 = Principal(Role.SERVICE, "catalog", "t2")


def record(origin: Origin) -> InstanceRecord:
    return InstanceRecord("catalog", "c1", "10.0.0.1", 80, origin=origin)


@pytest.mark.parametrize(
    ("origin", "owner", "claimant", "reason"),
    [
        # the admin may do anything
        (Origin.ADMIN, Claimant(CATALOG, "n1"), Claimant(ADMIN), None),
        (Origin.REST, None, Claimant(ADMIN, "n9"), None),
        # what the admin registered is the admin's
        (Origin.ADMIN, None, Claimant(CATALOG), "admin"),
        (Origin.ADMIN, None, Claimant(JOIN, "n1"), "admin"),
        # a live stream's instance is its own: another node, or its node with another token
        (Origin.STREAM, Claimant(CATALOG, "n1"), Claimant(CATALOG, "n1"), None),
        (Origin.STREAM, Claimant(CATALOG, "n1"), Claimant(CATALOG, "n2"), "owned"),
        (Origin.STREAM, Claimant(CATALOG, "n1"), Claimant(CATALOG_2, "n1"), "owned"),
        (Origin.STREAM, Claimant(CATALOG, "n1"), Claimant(CATALOG), "owned"),
        (Origin.STREAM, None, Claimant(CATALOG, "n2"), None),  # its sidecar is gone
        (Origin.STREAM, None, Claimant(CATALOG), None),
        # no stream takes over what was registered over REST
        (Origin.REST, None, Claimant(CATALOG, "n1"), "rest"),
        (Origin.REST, None, Claimant(CATALOG), None),
        # with no token configured everyone is OPEN, who is the admin
        (Origin.STREAM, Claimant(OPEN, "n1"), Claimant(OPEN, "n2"), None),
    ],
)
def test_refusal(
    origin: Origin, owner: Claimant | None, claimant: Claimant, reason: str | None
) -> None:
    found = refusal(record(origin), owner, claimant)
    assert (found.reason if found else None) == reason


def test_a_new_instance_or_no_change_is_never_refused() -> None:
    assert refusal(None, None, Claimant(JOIN, "n1")) is None
    assert refusal(record(Origin.ADMIN), None, Claimant(CATALOG), changes=False) is None


def test_what_an_instance_is_recorded_as() -> None:
    assert Claimant(ADMIN, "n1").origin is Origin.ADMIN
    assert Claimant(OPEN, "n1").origin is Origin.STREAM  # not the admin's when tokens come
    assert Claimant(JOIN).origin is Origin.REST


@pytest.mark.parametrize(
    ("fields", "changed"),
    [
        ({}, False),
        ({"weight": 100, "zone": "", "metadata": {}}, False),
        ({"port": 81}, True),
        ({"address": "10.0.0.2"}, True),
        ({"weight": 10_000}, True),
        ({"zone": "b"}, True),
        ({"metadata": {"v": "2"}}, True),
    ],
)
def test_changes(fields: dict[str, object], changed: bool) -> None:
    reg = Registration(**{"address": "10.0.0.1", "port": 80, "id": "c1", **fields})  # type: ignore[arg-type]
    assert changes(record(Origin.REST), reg) is changed
    assert changes(None, reg) is True
