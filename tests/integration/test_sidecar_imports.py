"""A real sidecar process imports neither aiohttp nor prometheus_client (issue 12: they cost
the idle sidecar about 17 MB of its 35 MB budget), nor cryptography (10 MB: its key and CSR
are made by a child process), nor h2 before an HTTP/2 connection comes (1.6 MB).

The sidecar is started as every process test starts one (``python -m sidecar``); a
``sitecustomize`` on its ``PYTHONPATH`` notes which module first imported either package and,
at exit, writes that and the top-level packages it had loaded. Before it exits the sidecar does
all it does at run time: holds the control plane's stream, applies a table, checks its app's
health, gets its workload certificate, serves ``/metrics`` and ``/config_dump``, proxies a
request (HTTP/1.1), and deregisters on SIGTERM.
"""

from __future__ import annotations

import json
import os
import threading
import urllib.request
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ControlPlane, Sidecar, eventually

pytestmark = pytest.mark.slow
FORBIDDEN = ("aiohttp", "prometheus_client", "cryptography", "h2")

RECORDER = '''
import atexit, json, os, sys

WATCHED = ("aiohttp", "prometheus_client", "cryptography", "h2")
importers = {}


def importer(top):
    """The first module up the stack that is neither importlib nor the package itself."""
    frame = sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        frozen = frame.f_code.co_filename.startswith("<frozen")
        if not frozen and not name.startswith(("importlib", top)):
            return name
        frame = frame.f_back
    return "?"


class Recorder:
    def find_spec(self, name, path=None, target=None):
        top = name.partition(".")[0]
        if top in WATCHED and top not in importers:
            importers[top] = importer(top)
        return None


sys.meta_path.insert(0, Recorder())


@atexit.register
def report():
    path = os.environ.get("MESHLET_TEST_IMPORTS")  # (not in the key maker's child)
    if not path:
        return
    loaded = sorted({m.partition(".")[0] for m in sys.modules})
    with open(path, "w") as f:
        json.dump({"importers": importers, "loaded": loaded}, f)
'''


@pytest.fixture
def app() -> Iterator[int]:
    """An app answering 200 to everything (its health check too); its port."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_running_sidecar_never_imports_aiohttp_prometheus_client_cryptography_or_h2(
    control_plane: Callable[..., ControlPlane],
    sidecar_process: Callable[..., Sidecar],
    app: int,
    tmp_path: Path,
) -> None:
    (tmp_path / "recorder").mkdir()
    (tmp_path / "recorder" / "sitecustomize.py").write_text(RECORDER)
    report = tmp_path / "imports.json"
    cp = control_plane("--store", "memory", "--debounce-quiet", "0.05")
    path = os.pathsep.join(filter(None, [str(tmp_path / "recorder"), os.environ.get("PYTHONPATH")]))
    sidecar = sidecar_process(
        "--service", "svc", "--control-plane", cp.url, "--app", f"http://127.0.0.1:{app}",
        "--advertise", "127.0.0.1", "--state-dir", str(tmp_path / "state"),
        "--app-health-interval", "0.1", "--deregister-delay", "0",
        env={**cp.sidecar_env("svc"), "PYTHONPATH": path, "MESHLET_TEST_IMPORTS": str(report)},
    )  # fmt: skip

    def stream() -> dict[str, Any]:
        state: dict[str, Any] = sidecar.admin("/config_dump")[1]["control_plane"]
        return state

    eventually(lambda: stream()["connected"] and stream()["app_healthy"], what="connected")
    eventually(
        lambda: sidecar.admin("/config_dump")[1]["identity"]["spiffe_id"] != "",
        what="its workload certificate",
    )
    eventually(
        lambda: "svc" in (sidecar.admin("/config_dump")[1]["table"] or {}).get("services", {})
    )
    for port in ("admin", "metrics"):
        with urllib.request.urlopen(f"http://127.0.0.1:{sidecar.ports[port]}/metrics") as r:
            assert r.status == 200
    proxied = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.ports['outbound']}/", headers={"Host": "svc"}
    )
    with urllib.request.urlopen(proxied, timeout=5) as r:
        assert (r.status, r.read()) == (200, b"ok")  # through its inbound listener to the app
    assert sidecar.stop() == 0
    assert "deregistered svc/" in sidecar.log()

    seen = json.loads(report.read_text())
    assert seen["importers"] == {}, f"imported by: {seen['importers']}"
    assert not set(FORBIDDEN) & set(seen["loaded"])
    assert {"sidecar", "uvloop", "httptools"} <= set(seen["loaded"])  # the report is real
