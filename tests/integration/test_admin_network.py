"""A real sidecar's admin port seen from another host: a network namespace joined to this one
by a veth pair. Without --admin-token a peer that is not loopback may not drain (403) but may
scrape the metrics port; with the token it may drain.

Needs root and iproute2 (``tests.netns``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.netns import Netns
from tests.processes import Sidecar

pytestmark = pytest.mark.slow
StartSidecar = Callable[..., Sidecar]


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
