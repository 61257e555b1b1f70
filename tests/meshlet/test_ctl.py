"""``meshlet ctl`` against a real control plane."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.processes import ControlPlane

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
