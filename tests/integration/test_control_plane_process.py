"""A real control-plane process: signals, restarts, SIGKILL mid-burst, start-up errors."""

from __future__ import annotations

import asyncio
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import fill
from tests.processes import ControlPlane, eventually, free_port, http

Start = Callable[..., ControlPlane]

pytestmark = pytest.mark.slow


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signals_shut_down_cleanly(control_plane: Start, tmp_path: Path, sig: int) -> None:
    cp = control_plane("--store", sqlite_url(tmp_path / "m.db"))
    assert cp.call("GET", "/readyz") == (200, {"status": "ready"})
    assert cp.stop(sig) == 0
    assert "stopped" in cp.log()
    assert "Traceback" not in cp.log()


def test_state_survives_a_restart(control_plane: Start, tmp_path: Path) -> None:
    db = sqlite_url(tmp_path / "m.db")
    cp = control_plane("--store", db)
    assert cp.call("PUT", "/v1/services/catalog/policy", {"lb": "round_robin"})[0] == 200
    for n in range(3):
        body = {"id": f"c{n}", "address": "10.0.0.1", "port": 8000 + n, "zone": "a"}
        assert cp.call("POST", "/v1/services/catalog/instances", body)[0] == 201
    assert cp.call("PATCH", "/v1/services/catalog/instances/c0", {"weight": 7})[0] == 200
    assert cp.call("PATCH", "/v1/services/catalog/instances/c1", {"status": "draining"})[0] == 200
    assert cp.call("DELETE", "/v1/services/catalog/instances/c2")[0] == 204
    assert cp.stop() == 0

    cp = control_plane("--store", db)
    status, service = cp.call("GET", "/v1/services/catalog")
    assert status == 200
    assert service["policy"]["lb"] == "round_robin"
    got = {i["id"]: (i["weight"], i["status"], i["zone"]) for i in service["instances"]}
    assert got == {"c0": (7, "healthy", "a"), "c1": (100, "draining", "a")}
    assert all(i["last_heartbeat"] is None for i in service["instances"])
    assert cp.stop() == 0


def test_heartbeats_do_not_write_the_store(control_plane: Start, tmp_path: Path) -> None:
    db_path = tmp_path / "m.db"
    cp = control_plane("--store", sqlite_url(db_path))
    assert cp.call("POST", "/v1/services/a/instances", {"id": "x", "address": "h", "port": 1})[0]
    # the registration's table version is written once, after the debounce: wait for it
    # (the version is stored before the table that holds it is served)
    eventually(lambda: "a" in cp.call("GET", "/v1/table")[1]["services"], what="table has a")
    wal = db_path.with_name("m.db-wal")
    before = (wal.stat().st_size, db_path.stat().st_mtime_ns)
    for _ in range(50):
        assert cp.call("PUT", "/v1/services/a/instances/x/heartbeat")[0] == 200
    assert (wal.stat().st_size, db_path.stat().st_mtime_ns) == before
    assert cp.stop() == 0


async def test_sigkill_during_a_write_burst_keeps_every_acknowledged_write(
    control_plane: Start, tmp_path: Path
) -> None:
    db_path = tmp_path / "m.db"
    cp = control_plane("--store", sqlite_url(db_path))
    acknowledged: set[str] = set()
    sent: dict[str, list[int]] = {}  # retries values sent per service, in order
    acked: dict[str, int] = {}  # index into sent[...] of the last acknowledged one
    enough = asyncio.Event()

    async def writer(session: aiohttp.ClientSession, w: int) -> None:
        for n in range(10_000):
            try:
                if n % 5 == 4:
                    values = sent.setdefault(f"svc-{w}", [])
                    values.append(n % 10)
                    async with session.put(
                        f"{cp.url}/v1/services/svc-{w}/policy", json={"retries": n % 10}
                    ) as r:
                        if r.status == 200:
                            acked[f"svc-{w}"] = len(values) - 1
                    continue
                body = {"id": f"w{w}-{n}", "address": "10.0.0.1", "port": 1 + n}
                async with session.post(f"{cp.url}/v1/services/svc-{w}/instances", json=body) as r:
                    if r.status == 201:
                        acknowledged.add(f"svc-{w}/w{w}-{n}")
                        if len(acknowledged) >= 400:
                            enough.set()
            except aiohttp.ClientError:
                return  # the process is gone

    async with aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {cp.admin_token}"}
    ) as session:
        writers = [asyncio.create_task(writer(session, w)) for w in range(16)]
        await asyncio.wait_for(enough.wait(), 10)
        cp.proc.send_signal(signal.SIGKILL)  # mid-burst: requests are in flight
        await asyncio.gather(*writers)
    assert cp.proc.wait(10) == -signal.SIGKILL
    assert len(acknowledged) >= 400

    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    cp = control_plane("--store", sqlite_url(db_path))
    found: set[str] = set()
    for w in range(16):
        status, data = cp.call("GET", f"/v1/services/svc-{w}")
        assert status == 200
        found |= {f"svc-{w}/{i['id']}" for i in data["instances"]}
        if f"svc-{w}" in acked:
            # the last acknowledged policy, or one sent after it that landed before the kill
            assert data["policy_set"] is True
            later = sent[f"svc-{w}"][acked[f"svc-{w}"] :]
            assert data["policy"]["retries"] in later
    assert acknowledged <= found
    assert cp.stop() == 0


def test_a_second_control_plane_on_the_same_file_exits_2(
    control_plane: Start, tmp_path: Path
) -> None:
    db = sqlite_url(tmp_path / "m.db")
    first = control_plane("--store", db)
    proc = subprocess.run(
        [sys.executable, "-m", "control_plane", "--listen", "127.0.0.1:0", "--store", db],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "another control plane is using this file" in proc.stderr
    assert first.call("GET", "/readyz")[0] == 200
    assert first.stop() == 0


def test_an_unusable_store_fails_at_start_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "junk.db").write_bytes(b"not a database" * 100)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "control_plane",
            "--listen",
            "127.0.0.1:0",
            "--store",
            sqlite_url(tmp_path / "junk.db"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert "cannot start" in proc.stderr
    assert "not a database" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_an_unusable_certificate_fails_at_start_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    argv = [sys.executable, "-m", "control_plane", "--listen", "127.0.0.1:0", "--store", "memory"]
    for cert, key in ((tmp_path / "cert.pem",) * 2, (tmp_path / "none.pem",) * 2):
        tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
        proc = subprocess.run([*argv, *tls], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2
        assert f"cannot start: tls_cert: cannot load {cert}" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_a_busy_port_fails_at_start_with_exit_2(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "control_plane",
                "--listen",
                f"127.0.0.1:{port}",
                "--store",
                "memory",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_flag_from_the_meshlet_command(tmp_path: Path) -> None:
    meshlet = Path(sys.executable).with_name("meshlet")
    proc = subprocess.run(
        [str(meshlet), "control-plane", "--remove-after", "1"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr == (
        "meshlet control-plane: error: --remove-after: must be more than --heartbeat-ttl\n"
    )


def test_meshlet_command_lists_subcommands() -> None:
    meshlet = Path(sys.executable).with_name("meshlet")
    out = subprocess.run([str(meshlet), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    assert "control-plane" in out.stdout
    assert "demo" in out.stdout
    bad = subprocess.run([str(meshlet), "frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "unknown subcommand 'frobnicate'" in bad.stderr


def test_admin_token_from_a_file(control_plane: Start, tmp_path: Path) -> None:
    (tmp_path / "admin.token").write_text("from-a-file\n")
    cp = control_plane(
        "--store", "memory", "--admin-token-file", str(tmp_path / "admin.token"), admin_token=""
    )
    body = {"address": "10.0.0.1", "port": 80}
    assert cp.call("POST", "/v1/services/a/instances", body)[0] == 401
    assert cp.call("POST", "/v1/services/a/instances", body, token="from-a-file")[0] == 201
    assert http("GET", cp.url + "/v1/services")[0] == 401  # reads need a token too
    assert http("GET", cp.url + "/healthz")[0] == 200
    assert "warning" not in cp.log()  # no token on the command line
    assert cp.stop() == 0


def test_expiry_with_real_time(control_plane: Start, tmp_path: Path) -> None:
    cp = control_plane(
        "--store",
        "memory",
        "--heartbeat-ttl",
        "0.4",
        "--remove-after",
        "0.8",
        env={"PYTHONUNBUFFERED": "1"},
    )
    for n in range(4):
        body = {"id": f"i{n}", "address": "10.0.0.1", "port": 8000 + n}
        assert cp.call("POST", "/v1/services/a/instances", body)[0] == 201
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # keep i0..i2 alive; i3 goes silent
        for n in range(3):
            cp.call("PUT", f"/v1/services/a/instances/i{n}/heartbeat")
        ids = [i["id"] for i in cp.call("GET", "/v1/services/a/instances")[1]["instances"]]
        if ids == ["i0", "i1", "i2"]:
            break
        time.sleep(0.1)
    assert ids == ["i0", "i1", "i2"]
    assert "removed a/i3" in cp.log()
    assert cp.stop() == 0


def test_not_ready_while_the_store_refuses_writes(control_plane: Start, small_disk: Path) -> None:
    cp = control_plane("--store", sqlite_url(small_disk / "m.db"), env={"PYTHONUNBUFFERED": "1"})
    body = {"id": "c1", "address": "10.0.0.1", "port": 80, "metadata": {"pad": "x" * 1000}}
    assert cp.call("POST", "/v1/services/a/instances", body)[0] == 201
    assert cp.call("GET", "/readyz")[0] == 200
    fill(small_disk)
    for n in range(2, 200):  # until the WAL's room is used up too
        status, answer = cp.call("POST", "/v1/services/a/instances", {**body, "id": f"c{n}"})
        if status != 201:
            break
    assert status == 503, answer
    status, answer = cp.call("GET", "/readyz")
    assert status == 503
    assert answer["reason"].startswith("store refuses writes: sqlite")
    (small_disk / "filler").unlink()
    eventually(lambda: cp.call("GET", "/readyz")[0] == 200, timeout=10, what="ready again")
    assert "store takes writes again" in cp.log()
    assert cp.stop() == 0


def test_requests_that_do_not_parse_are_one_line_each_within_a_budget(
    control_plane: Start,
) -> None:
    cp = control_plane("--store", "memory", env={"PYTHONUNBUFFERED": "1"})
    port = int(cp.url.rsplit(":", 1)[1])
    for n in range(20):
        with socket.create_connection(("127.0.0.1", port)) as s:
            line = b"/" + b"a" * 20_000 if n % 2 else b"/ HTTP/1.1\r\nX: " + b"b" * 20_000
            s.sendall(b"GET " + line + b" HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.0 400")
    assert cp.call("GET", "/healthz")[0] == 200
    log = cp.log()
    assert "Traceback" not in log
    bad = [line for line in log.splitlines() if "bad request from 127.0.0.1: 400" in line]
    assert len(bad) == 5  # the rest of the 20 in these 10 s are counted, not logged
    assert all(len(line) < 400 for line in bad)
    assert cp.stop() == 0


@pytest.mark.parametrize(
    ("store", "says"),
    [
        ("redis://user:s3cret@127.0.0.1:6379/0", "put no credentials in the redis URL"),
        ("redis://127.0.0.1:{port}/0", "cannot start: redis redis://127.0.0.1:{port}/0: "),
    ],
)
def test_a_bad_or_unreachable_redis_store_fails_at_start_with_one_line(
    store: str, says: str
) -> None:
    port = free_port()  # nothing listens there
    proc = subprocess.run(
        [sys.executable, "-m", "control_plane", "--listen", "127.0.0.1:0", "--store",
         store.format(port=port)],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert says.format(port=port) in proc.stderr
    assert "s3cret" not in proc.stderr
    assert "Traceback" not in proc.stderr
