"""Issue 13 end to end: two pods (``tests.pods``: network namespaces joined by veth pairs),
each with its app, a real sidecar joined to a control plane in the root namespace, and
``meshlet iptables install`` rules. The apps know nothing of the mesh: the frontend's clients
dial ``catalog:8080`` and ``outside:PORT`` as their hosts file resolves them, with no proxy,
as nobody (the sidecars run as root, ``--proxy-uid 0``), and the rules bring every connection
to the sidecars, which read where it was going (``SO_ORIGINAL_DST``):

- HTTP to a service of the mesh goes through both sidecars (they add their headers);
- TCP that is not HTTP (plain bytes, a TLS ClientHello, a server that speaks first on an
  ``--opaque-ports`` port) is relayed as it is, to where it was going;
- a host the mesh does not know is reached under ``--outbound-policy allow_any`` (the
  default) and refused under ``registry_only``;
- without the rules, the same clients reach the same servers directly.

Needs root, iproute2, iptables and setpriv.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pods import SIDECAR_UID, Pod, start_app, start_sidecar, two_pods
from tests.processes import ControlPlane, Process, eventually

pytestmark = pytest.mark.slow

APP_PORT = 8080
#: catalog's TCP servers: an echo on a port the sidecar knows nothing about, an echo standing
#: in for TLS (8443), and a server that speaks first on a default ``--opaque-ports`` port
ECHO_PORT, TLS_PORT, GREET_PORT = 9000, 8443, 3306
PLAIN = b"hello over plain tcp\n" + bytes(range(256)) * 64
#: a TLS 1.2 record holding a ClientHello's first bytes, then more of the stream
HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(32)) + b"\x00" * 500
GREETING = b"catalog speaks first\n"
#: headers only a sidecar adds to a request on its way
MESH_HEADERS = {"x-request-id", "x-forwarded-for", "x-meshlet-attempt"}


class Outside:
    """A host the mesh does not know: a plain HTTP server on the root namespace's end of the
    frontend's link, answering ``{"app": "outside"}``; ``hits`` counts its requests."""

    def __init__(self, address: str) -> None:
        self.hits = 0
        outside = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outside.hits += 1
                body = json.dumps({"app": "outside", "path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((address, 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass(frozen=True)
class Mesh:
    frontend: Pod
    catalog: Pod
    catalog_app: Process
    outside: Outside


def endpoints(pod: Pod, service: str) -> list[tuple[str, int]]:
    """The endpoints of ``service`` in the table the pod's sidecar has."""
    table = pod.admin("/config_dump")["table"] or {}
    entry = table.get("services", {}).get(service) or {}
    return [(e["address"], e["port"]) for e in entry.get("endpoints", [])]


@pytest.fixture
def mesh(
    request: pytest.FixtureRequest, tmp_path: Path, control_plane: Callable[..., ControlPlane]
) -> Iterator[Mesh]:
    """The two pods at work; the frontend's sidecar takes ``request.param``'s flags too
    (``indirect`` parametrization)."""
    frontend_flags: tuple[str, ...] = getattr(request, "param", ())
    with two_pods(tmp_path / "logs") as (frontend, catalog):
        cp = control_plane(
            "--listen", f"{frontend.root}:0", "--store", "memory", "--debounce-quiet", "0.05"
        )
        start_app(frontend)
        catalog_app = start_app(catalog, echo=(ECHO_PORT, TLS_PORT), greet=(GREET_PORT,))
        for pod, flags in ((catalog, ()), (frontend, frontend_flags)):
            assert pod.iptables("install", "--proxy-uid", str(SIDECAR_UID)) == "installed"
            start_sidecar(
                pod, "--control-plane", cp.url, "--advertise", pod.address,
                "--app", f"http://127.0.0.1:{APP_PORT}", "--app-health", "/healthz", *flags,
                env=cp.sidecar_env(pod.service),
            )  # fmt: skip
        # the catalog's instance, registered at its inbound listener, in the frontend's table
        eventually(
            lambda: (catalog.address, 15006) in endpoints(frontend, "catalog"),
            timeout=15,
            what="catalog in the frontend sidecar's table",
        )
        outside = Outside(frontend.root)
        try:
            yield Mesh(frontend, catalog, catalog_app, outside)
        finally:
            outside.stop()


def test_an_app_calls_another_service_by_name_through_both_sidecars(mesh: Mesh) -> None:
    answer = mesh.frontend.get("catalog", APP_PORT, "/items?page=2")
    assert answer.status == 200, answer
    assert answer.body["app"] == "catalog"
    assert answer.body["path"] == "/items?page=2"
    headers = dict(answer.body["headers"])
    assert headers.keys() >= MESH_HEADERS, headers  # added on the way
    assert mesh.frontend.address in headers["x-forwarded-for"]
    assert headers["host"] == f"catalog:{APP_PORT}"
    assert answer.body["peer"] == "127.0.0.1"  # handed over by its own sidecar


def test_tcp_that_is_not_http_passes_through_both_sidecars(mesh: Mesh) -> None:
    echoed = mesh.frontend.tcp("catalog", ECHO_PORT, PLAIN, len(PLAIN))
    assert echoed == PLAIN
    echoed = mesh.frontend.tcp("catalog", TLS_PORT, HELLO, len(HELLO))
    assert echoed == HELLO
    # an opaque port: relayed at once, without waiting for the client to speak
    greeted = mesh.frontend.tcp("catalog", GREET_PORT, b"", len(GREETING))
    assert greeted == GREETING
    # each reached the catalog's server from its sidecar, not straight from the frontend
    log = mesh.catalog_app.log()
    for port in (ECHO_PORT, TLS_PORT, GREET_PORT):
        assert f"peer {port} 127.0.0.1\n" in log, log
        assert f"peer {port} {mesh.frontend.address}\n" not in log, log


def test_a_host_outside_the_mesh_is_reached_under_allow_any(mesh: Mesh) -> None:
    answer = mesh.frontend.get("outside", mesh.outside.port, "/status")
    assert answer.status == 200, answer
    assert answer.body == {"app": "outside", "path": "/status"}
    assert mesh.outside.hits == 1
    # to where the connection was going, whatever its Host says
    elsewhere = mesh.frontend.get("outside", mesh.outside.port, host_header="nowhere.invalid")
    assert elsewhere.status == 200, elsewhere
    assert mesh.outside.hits == 2


@pytest.mark.parametrize(
    "mesh", [("--outbound-policy", "registry_only")], ids=["registry_only"], indirect=True
)
def test_registry_only_refuses_a_host_outside_the_mesh(mesh: Mesh) -> None:
    answer = mesh.frontend.get("outside", mesh.outside.port, "/status")
    assert answer.status == 502, answer
    assert answer.header("x-meshlet-error") == "no-route"
    assert mesh.outside.hits == 0
    assert mesh.frontend.get("catalog", APP_PORT).status == 200  # the mesh's own: as before


def test_uninstalling_the_rules_restores_direct_traffic(mesh: Mesh) -> None:
    through = mesh.frontend.get("catalog", APP_PORT)
    assert through.status == 200, through
    assert MESH_HEADERS & dict(through.body["headers"]).keys()

    for pod in (mesh.frontend, mesh.catalog):
        assert pod.iptables("uninstall") == "uninstalled"
    direct = mesh.frontend.get("catalog", APP_PORT)
    assert direct.status == 200, direct
    assert direct.body["peer"] == mesh.frontend.address
    assert not MESH_HEADERS & dict(direct.body["headers"]).keys()
    echoed = mesh.frontend.tcp("catalog", ECHO_PORT, PLAIN, len(PLAIN))
    assert echoed == PLAIN
    assert f"peer {ECHO_PORT} {mesh.frontend.address}\n" in mesh.catalog_app.log()
