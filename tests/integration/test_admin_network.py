"""A real sidecar's admin port seen from another host: a network namespace joined to this one
by a veth pair. Without --admin-token a peer that is not loopback may not drain (403) but may
scrape the metrics port; with the token it may drain.

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2; without them it fails, saying so,
rather than skipping: a skipped test would pass the rule it exists to check.
"""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Sidecar

pytestmark = pytest.mark.slow
StartSidecar = Callable[..., Sidecar]

#: runs inside the namespace: one request, its status and body as JSON on stdout
CLIENT = """
import json, sys, urllib.error, urllib.request
method, url, headers, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                             headers=headers)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=5) as r:
        status, raw = r.status, r.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
print(json.dumps({"status": status, "body": raw.decode(errors="replace")}))
"""


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Netns:
    """A namespace ``name`` whose only way out is a veth pair: ``host`` is this host's end,
    ``peer`` the namespace's (a /30)."""

    name: str
    host: str
    peer: str

    def http(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: str = ""
    ) -> tuple[int, Any]:
        """A request sent from inside the namespace: status and body (JSON when it is)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", CLIENT,
             method, url, json.dumps(headers or {}), body],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        try:
            return answer["status"], json.loads(answer["body"])
        except ValueError:
            return answer["status"], answer["body"]


@pytest.fixture
def netns() -> Iterator[Netns]:
    tag = secrets.token_hex(3)
    name, host_if, peer_if = f"meshlet-t-{tag}", f"mlh{tag}", f"mlp{tag}"
    base = f"10.{random.randrange(200, 255)}.{random.randrange(256)}.{random.randrange(0, 256, 4)}"
    prefix = base.rsplit(".", 1)[0]
    last = int(base.rsplit(".", 1)[1])
    host, peer = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"
    try:
        made = ip("netns", "add", name)
    except FileNotFoundError:
        pytest.fail("the ip command (iproute2) is missing: this test needs it, and root")
    if made.returncode != 0:
        pytest.fail(
            f"cannot create a network namespace ({made.stderr.strip()}): this test needs root "
            "(CAP_SYS_ADMIN and CAP_NET_ADMIN) to put a non-loopback peer in front of the "
            "admin port"
        )
    try:
        for step in (
            ("link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name),
            ("addr", "add", f"{host}/30", "dev", host_if),
            ("link", "set", host_if, "up"),
            ("-n", name, "addr", "add", f"{peer}/30", "dev", peer_if),
            ("-n", name, "link", "set", peer_if, "up"),
            ("-n", name, "link", "set", "lo", "up"),
        ):
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr.strip()}"
        yield Netns(name, host, peer)
    finally:
        ip("netns", "del", name)  # takes the namespace's end of the pair, and so the pair
        if ip("link", "show", host_if).returncode == 0:
            ip("link", "del", host_if)
    assert name not in ip("netns", "list").stdout


def start(sidecar_process: StartSidecar, tmp_path: Path, where: str, *extra: str) -> Sidecar:
    """A sidecar whose admin and metrics ports listen on ``where`` (not loopback)."""
    table = tmp_path / "table.yaml"
    table.write_text("services:\n  svc:\n    endpoints: [{address: 127.0.0.1, port: 9}]\n")
    return sidecar_process(
        "--service", "web", "--table", str(table),
        "--admin", f"{where}:0", "--metrics-listen", f"{where}:0", *extra,
    )  # fmt: skip


JSON = {"Content-Type": "application/json"}


def test_a_peer_that_is_not_loopback_may_scrape_but_not_drain(
    netns: Netns, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    sidecar = start(sidecar_process, tmp_path, netns.host)
    admin = f"http://{netns.host}:{sidecar.ports['admin']}"
    metrics = f"http://{netns.host}:{sidecar.ports['metrics']}"

    status, body = netns.http("POST", f"{admin}/drain", headers=JSON, body="{}")
    assert status == 403
    assert body == {
        "error": f"{netns.peer} is not a loopback address: without --admin-token only this "
        "host may make mutating calls"
    }
    assert f"admin POST /drain from {netns.peer} refused" in sidecar.log()

    status, text = netns.http("GET", f"{metrics}/metrics")
    assert status == 200
    assert "# TYPE meshlet_requests_total counter" in text
    assert any(line.startswith("meshlet_table_age_seconds ") for line in text.splitlines())
    assert netns.http("GET", f"{metrics}/readyz") == (200, {"status": "ready", "reason": ""})
    status, body = netns.http("GET", f"{metrics}/config_dump")
    assert status == 404  # the metrics port shows no configuration
    assert netns.http("GET", f"{admin}/readyz")[0] == 200  # reads stay open on the admin port
    assert sidecar.stop() == 0


def test_with_the_admin_token_that_peer_may_drain(
    netns: Netns, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    (tmp_path / "admin-token").write_text("s3cret-admin\n")
    sidecar = start(
        sidecar_process, tmp_path, netns.host, "--admin-token-file", str(tmp_path / "admin-token")
    )
    admin = f"http://{netns.host}:{sidecar.ports['admin']}"
    metrics = f"http://{netns.host}:{sidecar.ports['metrics']}"

    status, body = netns.http("POST", f"{admin}/drain", headers=JSON, body="{}")
    assert (status, body) == (401, {"error": "this call needs Authorization: Bearer <admin token>"})
    wrong = {**JSON, "Authorization": "Bearer s3cret-admiN"}
    assert netns.http("POST", f"{admin}/drain", headers=wrong, body="{}") == (
        401,
        {"error": "wrong admin token"},
    )
    assert netns.http("GET", f"{metrics}/readyz")[0] == 200

    right = {**JSON, "Authorization": "Bearer s3cret-admin"}
    status, body = netns.http("POST", f"{admin}/drain", headers=right, body="{}")
    assert (status, body) == (202, {"status": "draining"})
    assert netns.http("GET", f"{metrics}/readyz") == (
        503,
        {"status": "not ready", "reason": "draining"},
    )
    assert sidecar.stop() == 0
