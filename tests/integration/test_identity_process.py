"""Real processes: sidecars get their workload certificates from a real control plane over
the stream (their service tokens), trust its bundle, and show it on the admin port and in
metrics; a control plane restarted on its store finds them with valid certificates, and they
ask for none again."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.processes import ControlPlane, Sidecar, eventually, free_port

pytestmark = pytest.mark.slow

Start = Callable[..., ControlPlane]
StartSidecar = Callable[..., Sidecar]


def spiffe(service: str) -> str:
    return f"spiffe://cluster.local/ns/default/svc/{service}"


def identity(sidecar: Sidecar) -> dict[str, Any]:
    status, dump = sidecar.admin("/config_dump")
    assert status == 200
    found: dict[str, Any] = dump["identity"]
    return found


def certified(sidecar: Sidecar, service: str) -> dict[str, Any]:
    eventually(
        lambda: identity(sidecar)["spiffe_id"] == spiffe(service),
        what=f"{service}'s certificate",
    )
    return identity(sidecar)


def metric(url: str, name: str, **labels: str) -> float:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


def start_sidecar(start: StartSidecar, cp: ControlPlane, service: str, tmp_path: Path) -> Sidecar:
    return start(
        "--service",
        service,
        "--control-plane",
        cp.url,
        "--advertise",
        "127.0.0.1",
        "--app-health",
        "none",
        "--state-dir",
        str(tmp_path / f"state-{service}"),
        env={"MESHLET_TOKEN": cp.mint(service)},
    )


def test_sidecars_get_certificates_from_the_control_plane_and_keep_them_over_its_restart(
    control_plane: Start, sidecar_process: StartSidecar, tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    store = f"sqlite:///{tmp_path / 'cp.db'}"
    cp = control_plane("--store", store, "--listen", listen, "--debounce-quiet", "0.05")
    catalog = start_sidecar(sidecar_process, cp, "catalog", tmp_path)
    frontend = start_sidecar(sidecar_process, cp, "frontend", tmp_path)
    mine = certified(catalog, "catalog")
    certified(frontend, "frontend")
    # its key and CSR were made by a child process: the sidecar never mapped cryptography's
    # library (about 10 MB of RSS for as long as it runs)
    assert "cryptography" not in Path(f"/proc/{catalog.proc.pid}/maps").read_text()

    status, bundle = cp.call("GET", "/v1/trust-bundle")
    assert status == 200
    assert mine["trust_bundle"] == [root["sha256"] for root in bundle["roots"]]
    assert mine["mtls"] == "on"
    assert mine["seconds_to_expiry"] == pytest.approx(24 * 3600, abs=120)
    assert sum(mine["errors"].values()) == 0
    status, table = cp.call("GET", "/v1/table")
    assert status == 200
    (endpoint,) = table["services"]["catalog"]["endpoints"]
    assert endpoint["tls"] is True  # the hello said its inbound listener speaks mesh TLS
    issued = "meshlet_cp_certificates_issued_total"
    assert metric(cp.url, issued, service="catalog") == 1
    metrics_url = f"http://127.0.0.1:{catalog.ports['metrics']}"
    expiry = metric(metrics_url, "meshlet_identity_expiry_seconds")
    assert expiry == pytest.approx(24 * 3600, abs=120)

    cp.stop()
    assert identity(catalog)["spiffe_id"] == spiffe("catalog")  # no control plane: still in force
    again = control_plane("--store", store, "--listen", listen, "--debounce-quiet", "0.05")
    eventually(
        lambda: catalog.admin("/config_dump")[1]["control_plane"]["connected"] is True,
        timeout=20,
        what="the stream back",
    )
    assert identity(catalog)["serial"] == mine["serial"]  # valid: nothing asked
    assert metric(again.url, issued, service="catalog") == 0
