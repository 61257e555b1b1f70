"""How ``meshlet ctl`` shows answers: views of the control plane's JSON, and their forms."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import pytest

from meshlet.ctl import Grid, View, emit, plain, sidecars_view, table_view

ANSI = re.compile(r"\x1b\[[0-9;]*m")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def endpoint(port: int, **kw: Any) -> dict[str, Any]:
    e = {"address": "10.0.0.1", "port": port, "weight": 100, "zone": "", "draining": False}
    return {**e, "instance": f"i{port}", **kw}


def test_table_view_counts_and_marks_endpoints() -> None:
    data = {
        "type": "table",
        "version": 9,
        "epoch": "e1",
        "services": {
            "users": {"policy": {"lb": "maglev"}, "endpoints": []},
            "catalog": {
                "policy": {"lb": "round_robin"},
                "endpoints": [endpoint(1, zone="a", weight=5), endpoint(2, draining=True)],
            },
        },
    }
    assert plain(table_view(data)).splitlines() == [
        "table v9 (epoch e1): 2 services",
        "",
        "catalog: round_robin, 2 endpoints",
        "  ADDRESS     INSTANCE  WEIGHT  ZONE  DRAINING",
        "  10.0.0.1:1  i1        5       a     no",
        "  10.0.0.1:2  i2        100     -     yes",
        "",
        "users: maglev, 0 endpoints",  # still routed to (503), so still shown
    ]


def test_sidecars_view_shows_none_acked_and_none_connected() -> None:
    sidecar = {
        "node": "n1",
        "service": "svc",
        "instance": "i1",
        "token": "3f9a1c0b7d2e",
        "acked_version": 0,
        "last_nack": "services.x.policy.retries: must be at most 10",
        "connected_since": "2026-01-01T00:00:00Z",
    }
    lines = plain(sidecars_view([sidecar])).splitlines()
    assert re.split(r"\s{2,}", lines[1]) == [
        "n1",
        "svc",
        "i1",
        "3f9a1c0b7d2e",
        "-",  # nothing acknowledged yet
        "services.x.policy.retries: must be at most 10",
        "2026-01-01T00:00:00Z",
    ]
    assert sidecars_view([]) == ["no sidecars connected"]


VIEW: View = ["title [bold]line[/bold]", Grid(["NAME", "NOTE"], [["a[b]", "[red]x[/red]"]], "t")]


def test_emit_chooses_json_plain_or_rich_in_one_place() -> None:
    data = {"answer": 1}
    terminal = Terminal()
    emit(data, VIEW, True, terminal)  # --json wins even on a terminal
    assert json.loads(terminal.getvalue()) == data

    pipe = io.StringIO()
    emit(data, VIEW, False, pipe)
    assert pipe.getvalue() == "title [bold]line[/bold]\nt\n  NAME  NOTE\n  a[b]  [red]x[/red]\n"


def test_rich_shows_outside_text_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """Names and NACK reasons come from outside: rich must not read them as markup."""
    monkeypatch.setenv("COLUMNS", "100")
    out = Terminal()
    emit({}, VIEW, False, out)
    shown = ANSI.sub("", out.getvalue())
    assert "─" in shown  # drawn by rich
    assert "title [bold]line[/bold]" in shown
    assert ["a[b]", "[red]x[/red]"] in [line.split() for line in shown.splitlines()]
