"""The README's examples work as printed, its tables match the code, and so does the demo."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from control_plane.cli import build_parser
from control_plane.wire import DEFAULT_POLICY, to_json
from sidecar.cli import build_parser as build_sidecar_parser
from tests.processes import ControlPlane, Sidecar

pytestmark = pytest.mark.slow

README = (Path(__file__).parents[2] / "README.md").read_text()


def block_after(heading: str, lang: str) -> str:
    found = re.search(re.escape(heading) + r".*?```" + lang + r"\n(.*?)```", README, re.S)
    assert found, f"no ```{lang} block after {heading!r} in README.md"
    return found.group(1)


def commands(block: str) -> list[str]:
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def run_curl(command: str, env: dict[str, str] | None = None) -> str:
    assert command.startswith("curl ")
    done = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=30, env=env
    )
    assert done.returncode == 0, (command, done.stderr)
    if done.stdout:
        assert "error" not in json.loads(done.stdout), (command, done.stdout)
    return done.stdout


def test_readme_curl_examples_work_as_printed(
    control_plane: Callable[..., ControlPlane], tmp_path: Path
) -> None:
    setup = commands(block_after("### Try the API", "sh"))
    assert setup[1] == ".venv/bin/meshlet control-plane --admin-token-file admin.token &"
    subprocess.run(["bash", "-c", setup[0]], cwd=tmp_path, check=True, timeout=30)
    assert (tmp_path / "admin.token").stat().st_mode & 0o777 == 0o600
    cp = control_plane(
        "--store",
        f"sqlite:///{tmp_path}/meshlet.db",
        "--admin-token-file",
        str(tmp_path / "admin.token"),
        admin_token="",
    )
    env = {"PATH": "/usr/bin:/bin", "TOKEN": (tmp_path / "admin.token").read_text().strip()}
    expected_listing = json.loads(block_after("`GET /v1/services` answers", "json"))
    outputs = {}
    for command in commands(block_after("Then, on the default address:", "sh")):
        outputs[command] = run_curl(command.replace("http://127.0.0.1:7070", cp.url), env)
    listing = outputs['curl -s -H "Authorization: Bearer $TOKEN" http://127.0.0.1:7070/v1/services']
    assert json.loads(listing) == expected_listing
    assert len(outputs) == 8
    assert cp.stop() == 0


def test_readme_sidecar_example_works_as_printed(
    sidecar_process: Callable[..., Sidecar], tmp_path: Path
) -> None:
    (tmp_path / "items").write_text("the items")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    section = README.split("## The sidecar")[1].split("\n## ")[0]
    routes = block_after("## The sidecar", "yaml")
    for documented, server in zip(("8081", "8082"), servers, strict=True):
        routes = routes.replace(f"port: {documented}", f"port: {server.server_address[1]}")
    (tmp_path / "routes.yaml").write_text(routes)
    sidecar = sidecar_process("--service", "web", "--table", str(tmp_path / "routes.yaml"))
    blocks = [b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "15001" in b]
    (block,) = [b for b in blocks if "http2" not in b]
    outbound = f"127.0.0.1:{sidecar.ports['outbound']}"
    calls = commands(block)
    assert len(calls) == 2
    for command in calls:
        command = command.split("#")[0].replace("127.0.0.1:15001", outbound)
        done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
        assert (done.returncode, done.stdout) == (0, "the items"), (command, done.stderr)
    # the HTTP/2 section's curl (its h2load runs in tests/sidecar/test_h2.py: 40 streams at
    # once overflow http.server's listen backlog of 5 here)
    (block,) = [b for b in blocks if "http2" in b]
    curl = commands(block)[0].replace("127.0.0.1:15001", outbound)
    done = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=30)
    assert (done.returncode, done.stdout) == (0, "the items"), (curl, done.stderr)
    for server in servers:
        server.shutdown()
        server.server_close()
    assert sidecar.stop() == 0


def test_readme_locks_example_works_as_printed(
    control_plane: Callable[..., ControlPlane],
    sidecar_process: Callable[..., Sidecar],
    tmp_path: Path,
) -> None:
    example = block_after("## Locks", "python")
    cp = control_plane("--store", f"sqlite:///{tmp_path}/cp.db")
    sidecar = sidecar_process(
        "--service", "billing", "--control-plane", cp.url, "--app", "http://127.0.0.1:9",
        "--app-health", "none", "--advertise", "127.0.0.1", "--state-dir", str(tmp_path / "s"),
        env=cp.sidecar_env("billing"),
    )  # fmt: skip
    admin = f"http://127.0.0.1:{sidecar.ports['admin']}"
    runs = [
        subprocess.run(
            [sys.executable, "-c", example],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MESHLET_ADMIN": admin},
        )
        for _ in range(2)
    ]
    tokens = []
    for done in runs:
        assert done.returncode == 0, done.stderr
        found = re.fullmatch(r"wrote with fencing token (\d+)\n", done.stdout)
        assert found, done.stdout
        tokens.append(int(found.group(1)))
    assert tokens[1] > tokens[0]  # released on exit, taken again with a higher token


def test_readme_drain_example_works_as_printed(
    sidecar_process: Callable[..., Sidecar], tmp_path: Path
) -> None:
    section = README.split("## The sidecar")[1].split("\n## ")[0]
    (block,) = [b for b in re.findall(r"```sh\n(.*?)```", section, re.S) if "/drain" in b]
    (command,) = commands(block)
    (tmp_path / "routes.yaml").write_text("services: {}\n")
    sidecar = sidecar_process("--service", "web", "--table", str(tmp_path / "routes.yaml"))
    assert sidecar.admin("/readyz")[0] == 200
    command = command.replace("127.0.0.1:15000", f"127.0.0.1:{sidecar.ports['admin']}")
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert (done.returncode, json.loads(done.stdout)) == (0, {"status": "draining"}), done.stderr
    assert sidecar.admin("/readyz") == (503, {"status": "not ready", "reason": "draining"})
    assert sidecar.stop() == 0


def test_readme_sidecar_flag_table_matches_the_parser() -> None:
    section = README.split("## The sidecar")[1].split("\n## ")[0]
    documented = re.findall(r"^\| `(--[\w-]+)[^|]*\| `(MESHLET_\w+)` \|", section, re.M)
    parser = build_sidecar_parser("meshlet sidecar")
    flags = [a.option_strings[0] for a in parser._actions if a.option_strings[0] != "-h"]
    assert [flag for flag, _ in documented] == flags
    assert all(env == "MESHLET_" + flag[2:].replace("-", "_").upper() for flag, env in documented)


def test_readme_policy_table_matches_the_code() -> None:
    rows = re.findall(
        r"^\| `(\w+)` \| (.+?) \| .+ \|$",
        README.split("### The policy document")[1].split("\n### ")[0],
        re.M,
    )
    documented = dict(rows)
    defaults = to_json(DEFAULT_POLICY)
    assert list(documented) == list(defaults)
    for key, shown in documented.items():
        value = defaults[key]
        if value is None:
            assert shown in ("none", '`"off"`'), key
        elif isinstance(value, str):
            assert shown == f"`{value}`", key
        else:
            assert json.loads(shown.strip("`")) == value, key


def test_readme_flag_table_matches_the_parser() -> None:
    section = README.split("## The control plane")[1].split("###")[0]
    documented = re.findall(r"^\| `(--[\w-]+)[^|]*\| `(MESHLET_\w+)` \| ([^|]+) \|", section, re.M)
    parser = build_parser("meshlet control-plane")
    flags = {a.option_strings[0]: a for a in parser._actions if a.option_strings[0] != "-h"}
    assert [d[0] for d in documented] == list(flags)
    for flag, env, default in documented:
        assert env in (flags[flag].help or ""), flag
        shown = default.strip().strip("`")
        if shown != "none":
            assert f"default {shown})" in (flags[flag].help or ""), flag


def test_the_demo_runs_and_its_curl_commands_work() -> None:
    meshlet = Path(sys.executable).with_name("meshlet")
    with subprocess.Popen(
        [str(meshlet), "demo", "--seconds", "6"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    ) as demo:
        assert demo.stdout is not None
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if "Ctrl-C stops the demo" in line:
                break
        printed = [line.strip() for line in lines if line.strip().startswith("curl ")]
        assert len(printed) == 9, "".join(lines)
        outputs = [run_curl(command) for command in printed]
        rest = demo.stdout.read()
        assert demo.wait(30) == 0, "".join(lines) + rest
    out = "".join(lines) + rest
    assert [t["service"] for t in json.loads(outputs[4])["tokens"]] == ["catalog", "frontend"]
    assert json.loads(outputs[5])["items"] == 3  # the frontend, through its sidecar
    assert json.loads(outputs[7])["status"] == "draining"
    assert json.loads(outputs[8])["status"] == "healthy"
    assert "meshlet demo: summary after 6." in out
    assert out.rstrip().endswith("meshlet demo: stopped")
    assert "Traceback" not in out
