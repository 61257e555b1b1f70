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
from tests.processes import ADMIN_TOKEN, ControlPlane, Sidecar

pytestmark = pytest.mark.slow
MESHLET = str(Path(sys.executable).with_name("meshlet"))


def ctl(cp_url: str, *args: str, token: str = ADMIN_TOKEN) -> subprocess.CompletedProcess[str]:
    """``meshlet ctl ARGS`` with the admin token (in the environment, as a user should)."""
    env = {"MESHLET_CONTROL_PLANE": cp_url, "PATH": "/usr/bin:/bin"}
    if token:
        env["MESHLET_ADMIN_TOKEN"] = token
    return subprocess.run(
        [MESHLET, "ctl", *args], capture_output=True, text=True, timeout=30, env=env
    )


def test_ctl_round_trip(control_plane: Callable[..., ControlPlane]) -> None:
    cp = control_plane("--store", "memory")
    for n in (1, 2):
        body = {"id": f"c{n}", "address": "10.0.0.1", "port": 8080 + n, "zone": "a"}
        assert cp.call("POST", "/v1/services/catalog/instances", body)[0] == 201

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
    )
    assert out.returncode == 0, out.stderr
    policy = json.loads(out.stdout)
    assert (policy["retries"], policy["retry_budget"]["ratio"], policy["lb"]) == (
        3,
        0.5,
        "round_robin",
    )
    assert cp.call("GET", "/v1/services/catalog/policy")[1]["policy"]["retries"] == 3

    out = ctl(cp.url, "drain", "catalog", "c1")
    assert out.stdout.strip() == "catalog/c1: draining, weight 100"
    out = ctl(cp.url, "weight", "catalog", "c2", "7")
    assert out.stdout.strip() == "catalog/c2: healthy, weight 7"
    out = ctl(cp.url, "undrain", "catalog", "c1")
    assert out.stdout.strip() == "catalog/c1: healthy, weight 100"

    out = ctl(cp.url, "ring", "catalog", "--key", "u1")
    assert out.returncode == 1
    assert "does not hash in table v" in out.stderr
    ctl(cp.url, "policy", "catalog", "--set", "lb=maglev", "--set", "hash_on=path")
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
    cp = control_plane("--store", "memory")
    out = ctl(cp.url, "instances", "nope")
    assert (out.returncode, out.stdout) == (1, "")
    assert (
        out.stderr
        == "meshlet ctl: GET /v1/services/nope/instances: 404 no service 'nope' (field service)\n"
    )
    out = ctl(cp.url, "policy", "catalog", "--set", "retries=2", token="")
    assert out.returncode == 1
    assert "401" in out.stderr
    out = ctl(cp.url, "drain", "catalog", "c1", token=cp.mint("catalog"))
    assert out.returncode == 1
    assert "403" in out.stderr
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
    cp = control_plane("--store", "memory", "--debounce-quiet", "0.05")
    monkeypatch.setenv("MESHLET_ADMIN_TOKEN", ADMIN_TOKEN)  # for main() in this process
    for n, weight in ((1, 100), (2, 7)):
        body = {"id": f"c{n}", "address": "10.0.0.1", "port": 8080 + n, "weight": weight}
        assert cp.call("POST", "/v1/services/catalog/instances", {**body, "zone": "a"})[0]
    assert ctl(cp.url, "drain", "catalog", "c2").returncode == 0
    sidecar = sidecar_process(
        "--service",
        "frontend",
        "--control-plane",
        cp.url,
        "--app",
        "http://127.0.0.1:9",
        "--app-health",
        "none",
        "--advertise",
        "127.0.0.1",
        "--state-dir",
        str(tmp_path / "state"),
        env=cp.sidecar_env("frontend"),
    )
    inbound = f"127.0.0.1-{sidecar.ports['inbound']}"

    # the sidecar's own registration is a change too, and so is its inbound taking mesh TLS
    # once its certificate is signed: wait until it acknowledged the table that says both
    for _ in range(100):
        table = json.loads(ctl(cp.url, "table", "--json").stdout)
        sidecars = json.loads(ctl(cp.url, "sidecars", "--json").stdout)["sidecars"]
        acked = [s["acked_version"] for s in sidecars]
        frontend = table["services"].get("frontend", {"endpoints": []})["endpoints"]
        meshed = bool(frontend) and all(e.get("tls") for e in frontend)
        if meshed and acked == [table["version"]]:
            break
        time.sleep(0.1)
    assert meshed, table
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
        "TOKEN",
        "ACKED",
        "LAST",
        "NACK",
        "CONNECTED",
        "SINCE",
    ]
    node, *cells, since = row.split()
    assert node == sidecars[0]["node"]
    assert node.startswith("frontend-")
    assert cells == ["frontend", inbound, sidecars[0]["token"], f"v{version}", "-"]
    assert re.fullmatch(r"[0-9a-f]{12}", sidecars[0]["token"])  # its service token's id
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
    assert [node, "frontend", inbound, sidecars[0]["token"], f"v{version}", "-", since] in rows

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
    assert out.stderr == "meshlet ctl: GET /v1/sidecars: 404 not found: GET /v1/sidecars\n"
    assert sidecar.stop() == 0
    assert cp.stop() == 0


def test_ctl_tokens_create_list_revoke(
    control_plane: Callable[..., ControlPlane], tmp_path: Path
) -> None:
    cp = control_plane("--store", "memory")
    out = ctl(cp.url, "token", "create", "catalog", "--description", "catalog pods")
    assert out.returncode == 0, out.stderr
    first, secret, note = out.stdout.splitlines()
    token_id = re.fullmatch(r"token (\w+) for service catalog:", first)
    assert token_id is not None, first
    assert "shown this once" in note
    body = {"address": "10.0.0.1", "port": 80}
    assert cp.call("POST", "/v1/services/catalog/instances", body, token=secret)[0] == 201

    out = ctl(cp.url, "token", "list")
    header, row = out.stdout.splitlines()
    assert header.split() == ["ID", "SERVICE", "DESCRIPTION", "CREATED", "LAST", "USED"]
    assert row.split()[:4] == [token_id[1], "catalog", "catalog", "pods"]
    assert secret not in out.stdout
    listed = json.loads(ctl(cp.url, "token", "list", "--json").stdout)["tokens"]
    assert [t["id"] for t in listed] == [token_id[1]]

    out = ctl(cp.url, "token", "revoke", token_id[1])
    assert out.stdout == f"token {token_id[1]} revoked; the streams it opened are closed\n"
    assert cp.call("POST", "/v1/services/catalog/instances", body, token=secret)[0] == 401
    assert ctl(cp.url, "token", "list").stdout == "no service tokens\n"
    out = ctl(cp.url, "token", "revoke", token_id[1])
    assert (out.returncode, out.stderr.count("\n")) == (1, 1)
    assert "404" in out.stderr

    # the token from a file, as a script should keep it
    (tmp_path / "admin").write_text(ADMIN_TOKEN + "\n")
    env = {"MESHLET_CONTROL_PLANE": cp.url, "PATH": "/usr/bin:/bin"}
    argv = [MESHLET, "ctl", "--admin-token-file", str(tmp_path / "admin"), "token", "list"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, env=env)
    assert (done.returncode, done.stdout) == (0, "no service tokens\n")
    assert cp.stop() == 0


def test_set_key_takes_a_comma_list_for_a_list_key() -> None:
    policy: dict[str, object] = {"allow_from": ["*"], "retry_on": ["reset"], "mtls": "permissive"}
    for assignment in ("allow_from=web, orders", "retry_on=reset,503", "mtls=strict"):
        ctl_module.set_key(policy, assignment)
    assert policy == {
        "allow_from": ["web", "orders"],
        "retry_on": ["reset", "503"],
        "mtls": "strict",
    }
    ctl_module.set_key(policy, "allow_from=*")
    ctl_module.set_key(policy, 'retry_on=["reset"]')  # JSON still works
    assert (policy["allow_from"], policy["retry_on"]) == (["*"], ["reset"])


def test_ctl_sets_mtls_and_allow_from(control_plane: Callable[..., ControlPlane]) -> None:
    cp = control_plane("--store", "memory")
    assert cp.call("PUT", "/v1/services/catalog/policy", {})[0] == 200
    out = ctl(cp.url, "policy", "catalog", "mtls=strict", "allow_from=web,orders", "--json")
    assert out.returncode == 0, out.stderr
    policy = json.loads(out.stdout)["policy"]
    assert (policy["mtls"], policy["allow_from"]) == ("strict", ["web", "orders"])
    out = ctl(cp.url, "policy", "catalog", "allow_from=web,web")
    assert out.returncode == 1
    assert "allow_from[1]" in out.stderr
    assert cp.stop() == 0
