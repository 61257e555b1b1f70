"""``meshlet ctl`` against a real control plane."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from meshlet import ctl as ctl_module
from tests.processes import ControlPlane, Sidecar

pytestmark = pytest.mark.slow
MESHLET = str(Path(sys.executable).with_name("meshlet"))


def ctl(cp_url: str, *args: str, token: str = "") -> subprocess.CompletedProcess[str]:
    env = {"MESHLET_CONTROL_PLANE": cp_url, "PATH": "/usr/bin:/bin"}
    if token:
        env["MESHLET_ADMIN_TOKEN"] = token
    return subprocess.run(
        [MESHLET, "ctl", *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_ctl_round_trip(control_plane: Callable[..., ControlPlane]) -> None:
    cp = control_plane("--store", "memory", "--admin-token", "tok")
    auth = {"Authorization": "Bearer tok"}
    for n in (1, 2):
        body = {"id": f"c{n}", "address": "10.0.0.1", "port": 8080 + n, "zone": "a"}
        assert cp.call("POST", "/v1/services/catalog/instances", body, auth)[0] == 201

    out = ctl(cp.url, "services")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0].split() == [
        "SERVICE",
        "LB",
        "HEALTHY",
        "UNHEALTHY",
        "DRAINING",
        "TOTAL",
    ]
    assert out.stdout.splitlines()[1].split() == ["catalog", "peak_ewma", "2", "0", "0", "2"]

    out = ctl(cp.url, "instances", "catalog", "--json")
    assert [i["id"] for i in json.loads(out.stdout)["instances"]] == ["c1", "c2"]

    out = ctl(
        cp.url,
        "policy",
        "catalog",
        "--set",
        "retries=3",
        "--set",
        "retry_budget.ratio=0.5",
        "--set",
        "lb=round_robin",
        token="tok",
    )
    assert out.returncode == 0, out.stderr
    policy = json.loads(out.stdout)
    assert (policy["retries"], policy["retry_budget"]["ratio"], policy["lb"]) == (
        3,
        0.5,
        "round_robin",
    )
    assert cp.call("GET", "/v1/services/catalog/policy")[1]["policy"]["retries"] == 3

    out = ctl(cp.url, "drain", "catalog", "c1", token="tok")
    assert out.stdout.strip() == "catalog/c1: draining, weight 100"
    out = ctl(cp.url, "weight", "catalog", "c2", "7", token="tok")
    assert out.stdout.strip() == "catalog/c2: healthy, weight 7"
    out = ctl(cp.url, "undrain", "catalog", "c1", token="tok")
    assert out.stdout.strip() == "catalog/c1: healthy, weight 100"

    out = ctl(cp.url, "ring", "catalog", "--key", "u1")
    assert out.returncode == 1
    assert "does not hash in table v" in out.stderr
    ctl(cp.url, "policy", "catalog", "--set", "lb=maglev", "--set", "hash_on=path", token="tok")
    for key in ("u1", "user 2/&x"):
        for _ in range(50):  # answers by the pushed table: the change lands within a debounce
            out = ctl(cp.url, "ring", "catalog", "--key", key)
            if out.returncode == 0:
                break
            time.sleep(0.1)
        assert out.returncode == 0, out.stderr
        owner = ctl(cp.url, "ring", "catalog", "--key", key, "--json")
        answer = json.loads(owner.stdout)
        assert answer["key"] == key
        assert answer["instance"] in ("c1", "c2")
        assert out.stdout == f"{key} -> {answer['instance']} (maglev, table v{answer['version']})\n"
    assert cp.stop() == 0


def test_ctl_refusals_are_one_line_exit_1(control_plane: Callable[..., ControlPlane]) -> None:
    cp = control_plane("--store", "memory", "--admin-token", "tok")
    out = ctl(cp.url, "instances", "nope")
    assert (out.returncode, out.stdout) == (1, "")
    assert (
        out.stderr
        == "meshlet ctl: GET /v1/services/nope/instances: 404 no service 'nope' (field service)\n"
    )
    out = ctl(cp.url, "policy", "catalog", "--set", "retries=2")
    assert out.returncode == 1
    out = ctl(cp.url, "drain", "catalog", "c1")
    assert out.returncode == 1
    assert "401" in out.stderr
    assert cp.stop() == 0

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = ctl(f"http://127.0.0.1:{port}", "services")
    assert out.returncode == 1
    assert out.stderr.startswith(
        f"meshlet ctl: control plane at http://127.0.0.1:{port} is unreachable"
    )
    assert out.stderr.count("\n") == 1


class Terminal(io.StringIO):
    """Captured output that says it is a terminal, as a person's shell does."""

    def isatty(self) -> bool:
        return True


ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_ctl_sidecars_and_table(
    control_plane: Callable[..., ControlPlane],
    sidecar_process: Callable[..., Sidecar],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cp = control_plane("--store", "memory", "--debounce-quiet", "0.05", "--admin-token", "tok")
    auth = {"Authorization": "Bearer tok"}
    for n, weight in ((1, 100), (2, 7)):
        body = {"id": f"c{n}", "address": "10.0.0.1", "port": 8080 + n, "weight": weight}
        assert cp.call("POST", "/v1/services/catalog/instances", {**body, "zone": "a"}, auth)[0]
    assert ctl(cp.url, "drain", "catalog", "c2", token="tok").returncode == 0
    sidecar = sidecar_process(
        "--service",
        "frontend",
        "--control-plane",
        cp.url,
        "--join-token",
        "tok",  # with an admin token set, the stream wants a token too
        "--app",
        "http://127.0.0.1:9",
        "--app-health",
        "none",
        "--advertise",
        "127.0.0.1",
        "--state-dir",
        str(tmp_path / "state"),
    )
    inbound = f"127.0.0.1-{sidecar.ports['inbound']}"

    # the sidecar's own registration is a change too: wait until it acknowledged the table
    # that holds it
    for _ in range(100):
        table = json.loads(ctl(cp.url, "table", "--json").stdout)
        sidecars = json.loads(ctl(cp.url, "sidecars", "--json").stdout)["sidecars"]
        acked = [s["acked_version"] for s in sidecars]
        if "frontend" in table["services"] and acked == [table["version"]]:
            break
        time.sleep(0.1)
    version = table["version"]
    assert len(sidecars) == 1
    assert (sidecars[0]["service"], sidecars[0]["instance"]) == ("frontend", inbound)
    assert sidecars[0]["acked_version"] == version

    out = ctl(cp.url, "sidecars")
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split() == [
        "NODE",
        "SERVICE",
        "INSTANCE",
        "ACKED",
        "LAST",
        "NACK",
        "CONNECTED",
        "SINCE",
    ]
    node, *cells, since = row.split()
    assert node == sidecars[0]["node"]
    assert node.startswith("frontend-")
    assert cells == ["frontend", inbound, f"v{version}", "-"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", since)

    out = ctl(cp.url, "table")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[:3] == [
        f"table v{version} (epoch {table['epoch']}): 2 services",
        "",
        "catalog: peak_ewma, 2 endpoints",
    ]
    assert [line.split() for line in lines[3:6]] == [
        ["ADDRESS", "INSTANCE", "WEIGHT", "ZONE", "DRAINING"],
        ["10.0.0.1:8081", "c1", "100", "a", "no"],
        ["10.0.0.1:8082", "c2", "7", "a", "yes"],
    ]
    assert lines[3].startswith("  ADDRESS")  # indented under its service
    assert lines[6:9] == ["", "frontend: peak_ewma, 1 endpoint", lines[8]]
    assert lines[9].split() == [f"127.0.0.1:{sidecar.ports['inbound']}", inbound, "100", "-", "no"]
    assert len(lines) == 10

    # on a terminal: rich tables with the same cells
    monkeypatch.setenv("COLUMNS", "200")
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert ctl_module.main(["--control-plane", cp.url, "table"]) == 0
    shown = ANSI.sub("", terminal.getvalue())
    assert "─" in shown  # a rich table's rule, which the plain form never draws
    assert f"table v{version} (epoch {table['epoch']}): 2 services" in shown
    assert "catalog: peak_ewma, 2 endpoints" in shown
    rows = [line.split() for line in shown.splitlines()]
    assert ["10.0.0.1:8082", "c2", "7", "a", "yes"] in rows
    assert [f"127.0.0.1:{sidecar.ports['inbound']}", inbound, "100", "-", "no"] in rows
    terminal = Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    assert ctl_module.main(["--control-plane", cp.url, "sidecars"]) == 0
    rows = [line.split() for line in ANSI.sub("", terminal.getvalue()).splitlines()]
    assert [node, "frontend", inbound, f"v{version}", "-", since] in rows

    # --json and pipes never load rich
    script = (
        "import sys; from meshlet.ctl import main; "
        f"assert main(['--control-plane', {cp.url!r}, 'table', '--json']) == 0; "
        f"assert main(['--control-plane', {cp.url!r}, 'sidecars']) == 0; "
        "assert 'rich' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    assert done.returncode == 0, done.stderr

    # pointed at the wrong port (the sidecar's admin), the answer is a one-line 404
    out = ctl(f"http://127.0.0.1:{sidecar.ports['admin']}", "sidecars")
    assert (out.returncode, out.stdout) == (1, "")
    assert out.stderr == "meshlet ctl: GET /v1/sidecars: 404 Not Found\n"
    assert sidecar.stop() == 0
    assert cp.stop() == 0
