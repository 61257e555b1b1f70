"""A real Prometheus scrapes a control plane and two sidecars (their metrics ports): all up,
and the request counters it stores match the traffic sent. The shipped Prometheus config is
valid, and the example pod exposes the metrics port, not the admin port."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pytest
import yaml

from tests.processes import Backend, ControlPlane, Sidecar, eventually, free_port

pytestmark = pytest.mark.slow
DEPLOY = Path(__file__).parents[2] / "deploy"


def tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} not found: apt-get install prometheus (.ci/run does)"
    return found


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[list[str]], str]]:
    """Start Prometheus scraping the given host:port targets every 0.5 s; its base URL."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[BinaryIO] = []

    def start(targets: list[str]) -> str:
        port = free_port()
        config = {
            "global": {"scrape_interval": "500ms", "scrape_timeout": "400ms"},
            "scrape_configs": [{"job_name": "meshlet", "static_configs": [{"targets": targets}]}],
        }
        path = tmp_path / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        log = (tmp_path / "prometheus.log").open("wb")
        logs.append(log)
        procs.append(
            subprocess.Popen(
                [
                    tool("prometheus"),
                    f"--config.file={path}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
        url = f"http://127.0.0.1:{port}"
        eventually(lambda: _ready(url), timeout=30, what="prometheus ready")
        return url

    yield start
    for p in procs:
        p.terminate()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    for log in logs:
        log.close()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/-/ready", timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def whoami(sidecar: Sidecar, host: str) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.ports['outbound']}/whoami", headers={"Host": host}
    )
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return e.code


def query(url: str, promql: str) -> list[dict[str, Any]]:
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(f"{url}/api/v1/query?{q}", timeout=5) as r:
        answer = json.loads(r.read())
    assert answer["status"] == "success", answer
    result: list[dict[str, Any]] = answer["data"]["result"]
    return result


def test_prometheus_scrapes_the_mesh_and_counts_the_traffic(
    control_plane: Callable[..., ControlPlane],
    sidecar_process: Callable[..., Sidecar],
    prometheus: Callable[[list[str]], str],
    tmp_path: Path,
) -> None:
    cp = control_plane("--store", "memory", "--debounce-quiet", "0.05")
    items = Backend(tmp_path / "logs", "items")
    try:
        common = ("--control-plane", cp.url, "--advertise", "127.0.0.1")
        front = sidecar_process(
            "--service",
            "front",
            "--app-health",
            "none",
            "--state-dir",
            str(tmp_path / "f"),
            *common,
            env=cp.sidecar_env("front"),
        )
        back = sidecar_process(
            "--service", "items", "--app", f"http://127.0.0.1:{items.port}",
            "--state-dir", str(tmp_path / "b"), *common, env=cp.sidecar_env("items"),
        )  # fmt: skip

        eventually(lambda: whoami(front, "items") == 200, timeout=20, what="front finds items")
        for _ in range(20):
            assert whoami(front, "items") == 200
        sent = 21  # and the one that found the route (those before it: 404 or 503)

        targets = {
            cp.url.removeprefix("http://"): "control plane",
            f"127.0.0.1:{front.ports['metrics']}": "front",
            f"127.0.0.1:{back.ports['metrics']}": "items",
        }
        url = prometheus(list(targets))

        def all_up() -> bool:
            up = {r["metric"]["instance"]: r["value"][1] for r in query(url, "up")}
            return up == dict.fromkeys(targets, "1")

        eventually(all_up, timeout=30, what="every target up")
        counted: dict[str, float] = {}

        def counts_match() -> bool:
            for direction, sidecar in (("outbound", front), ("inbound", back)):
                found = query(
                    url,
                    f'meshlet_requests_total{{direction="{direction}",service="items",'
                    f'code="2xx",instance="127.0.0.1:{sidecar.ports["metrics"]}"}}',
                )
                counted[direction] = float(found[0]["value"][1]) if found else 0.0
            return counted == {"outbound": sent, "inbound": sent}

        eventually(counts_match, timeout=15, what=f"request counters: {counted}")
        (instances,) = query(url, 'meshlet_registry_instances{service="items",status="healthy"}')
        assert instances["value"][1] == "1"
        (sidecars,) = query(url, "meshlet_connected_sidecars")
        assert sidecars["value"][1] == "2"
    finally:
        items.kill()


def test_the_shipped_prometheus_config_is_valid(tmp_path: Path) -> None:
    """promtool checks it, with static targets standing in for Kubernetes discovery (Debian's
    Prometheus is built without it); the pod annotations it keys on are in the example pod."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    job["static_configs"] = [{"targets": ["127.0.0.1:15020"]}]
    assert config["rule_files"] == ["alerts.yaml"]  # (checked beside it: test_dashboards.py)
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yaml")]
    checked = tmp_path / "prometheus.yml"
    checked.write_text(yaml.safe_dump(config))
    done = subprocess.run(
        [tool("promtool"), "check", "config", str(checked)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    # the laptop's (deploy/compose.yaml): static targets already, the same rules
    compose = DEPLOY / "prometheus" / "compose.yml"
    done = subprocess.run(
        [tool("promtool"), "check", "config", str(compose)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    pod = yaml.safe_load((DEPLOY / "kubernetes" / "example-pod.yaml").read_text())
    annotations = pod["metadata"]["annotations"]
    assert {k: v for k, v in annotations.items() if k.startswith("prometheus.io/")} == {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": "15020",
        "prometheus.io/path": "/metrics",
    }
    (sidecar,) = [c for c in pod["spec"]["initContainers"] if c["name"] == "meshlet"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: the app starts after it
    env = {e["name"]: e.get("value") for e in sidecar["env"]}
    assert env["MESHLET_METRICS_LISTEN"] == "0.0.0.0:15020"  # Prometheus and the kubelet
    assert "MESHLET_ADMIN" not in env  # /drain stays on loopback
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15020}
    assert "MESHLET_TOKEN" not in env  # a secret belongs in a file, not in the pod spec
    mount = sidecar["volumeMounts"][0]["mountPath"]
    assert env["MESHLET_TOKEN_FILE"].startswith(mount + "/")
