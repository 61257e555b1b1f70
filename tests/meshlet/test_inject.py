"""``meshlet inject``: what a workload's pods get, in both modes, valid Kubernetes for the
current release and 1.29 (the first with native sidecars); injecting its own output changes
nothing, ``--uninject`` gives the input back; bad input is one line and exit 2."""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from meshlet.inject import main
from meshlet.pods import MARKER

EXAMPLE_POD = Path(__file__).parents[2] / "deploy" / "kubernetes" / "example-pod.yaml"
VERSIONS = (kubernetes_validate.latest_version(), "1.29.0")
Doc = dict[str, Any]


def template(**spec: Any) -> Doc:
    """A pod template: the catalog app on 8080, and whatever ``spec`` adds."""
    app = {"name": "app", "image": "example/catalog:1.0", "ports": [{"containerPort": 8080}]}
    return {"metadata": {"labels": {"app": "catalog"}}, "spec": {"containers": [app], **spec}}


def workload(kind: str, pod: Doc | None = None) -> Doc:
    """A minimal valid ``kind`` around ``pod`` (a Pod: the template itself)."""
    pod = pod or template()
    select = {"selector": {"matchLabels": {"app": "catalog"}}, "template": pod}
    job = {"template": {**pod, "spec": {**pod["spec"], "restartPolicy": "Never"}}}
    specs: dict[str, tuple[str, Doc]] = {
        "Pod": ("v1", pod["spec"]),
        "ReplicationController": ("v1", {"selector": {"app": "catalog"}, "template": pod}),
        "Deployment": ("apps/v1", select),
        "StatefulSet": ("apps/v1", {**select, "serviceName": "catalog"}),
        "DaemonSet": ("apps/v1", select),
        "ReplicaSet": ("apps/v1", select),
        "Job": ("batch/v1", job),
        "CronJob": ("batch/v1", {"schedule": "*/5 * * * *", "jobTemplate": {"spec": job}}),
    }
    api, spec = specs[kind]
    metadata = {"name": "catalog-1", **(pod["metadata"] if kind == "Pod" else {})}
    return {"apiVersion": api, "kind": kind, "metadata": metadata, "spec": copy.deepcopy(spec)}


KINDS = (
    "Pod",
    "ReplicationController",
    "Deployment",
    "StatefulSet",
    "DaemonSet",
    "ReplicaSet",
    "Job",
    "CronJob",
)


def pod_of(doc: Doc) -> Doc:
    """The pod template in an (injected) workload."""
    kind = doc["kind"]
    if kind == "Pod":
        return doc
    if kind == "CronJob":
        return pod_of({"kind": "Job", "spec": doc["spec"]["jobTemplate"]["spec"]})
    template: Doc = doc["spec"]["template"]
    return template


#: the fixture below: run(YAML text or documents, *flags) -> (exit status, stdout, stderr)
Run = Callable[..., tuple[int, str, str]]


@pytest.fixture
def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Run:
    """Injects a file, in.yaml, in a directory of its own."""
    monkeypatch.chdir(tmp_path)

    def run(text: str | list[Doc], *flags: str) -> tuple[int, str, str]:
        Path("in.yaml").write_text(text if isinstance(text, str) else yaml.safe_dump_all(text))
        status = main(["in.yaml", *flags])
        out, err = capsys.readouterr()
        return status, out, err

    return run


def inject(run: Run, docs: list[Doc] | str, *flags: str) -> list[Doc]:
    status, out, err = run(docs, *flags)
    assert status == 0, err
    return list(yaml.safe_load_all(out))


def names(containers: list[Doc]) -> list[str]:
    return [c["name"] for c in containers]


def env_of(container: Doc) -> dict[str, str]:
    return {var["name"]: var.get("value") for var in container.get("env", [])}


# -- what a pod gets ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_workload_kind_injected_is_valid_kubernetes(run: Run, kind: str, mode: str) -> None:
    (doc,) = inject(run, [workload(kind)], "--mode", mode)
    pod = pod_of(doc)
    sidecar = ["meshlet-iptables", "meshlet"] if mode == "iptables" else ["meshlet"]
    assert names(pod["spec"]["initContainers"]) == sidecar
    assert pod["metadata"]["annotations"][MARKER] == mode
    for version in VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{kind} ({mode}) against Kubernetes {version}: {e.message}")


def test_an_injected_pod_is_the_example_pod(run: Run) -> None:
    """deploy/kubernetes/example-pod.yaml and inject cannot drift apart: its pod without the
    meshlet parts, injected, is the example again (with inject's marker)."""
    example = yaml.safe_load(EXAMPLE_POD.read_text())
    bare = copy.deepcopy(example)
    del bare["spec"]["initContainers"], bare["spec"]["volumes"], bare["metadata"]["annotations"]
    assert bare["spec"]["containers"][0]["name"] == "app"  # (the app is all that is left)
    (injected,) = inject(run, [bare])
    example["metadata"]["annotations"][MARKER] = "iptables"
    assert injected["spec"]["initContainers"] == example["spec"]["initContainers"]
    assert injected == example
    assert inject(run, [injected], "--uninject") == [bare]


def test_the_app_own_init_containers_run_after_the_mesh_in_their_order(run: Run) -> None:
    own = [{"name": "migrate", "image": "app:1"}, {"name": "seed", "image": "app:1"}]
    (doc,) = inject(run, [workload("Deployment", template(initContainers=own))])
    inits = pod_of(doc)["spec"]["initContainers"]
    assert names(inits) == ["meshlet-iptables", "meshlet", "migrate", "seed"]
    assert inits[2:] == own


def test_the_service_comes_from_the_flag_the_app_label_or_the_name(run: Run) -> None:
    def service(doc: Doc, *flags: str) -> str:
        (injected,) = inject(run, [doc], *flags)
        sidecar = pod_of(injected)["spec"]["initContainers"][1]
        volume = pod_of(injected)["spec"]["volumes"][0]
        assert (
            volume["secret"]["secretName"] == f"{env_of(sidecar)['MESHLET_SERVICE']}-meshlet-token"
        )
        return env_of(sidecar)["MESHLET_SERVICE"]

    deployment = workload("Deployment")
    assert service(deployment) == "catalog"
    assert service(deployment, "--service", "shop") == "shop"
    pod_of(deployment)["metadata"]["labels"]["app.kubernetes.io/name"] = "store"
    assert service(deployment) == "store"
    pod_of(deployment)["metadata"]["labels"] = {"tier": "web"}
    assert service(deployment) == "catalog-1"


def test_the_app_port_comes_from_the_flag_or_the_first_container_port(run: Run) -> None:
    def app(doc: Doc, *flags: str) -> str:
        (injected,) = inject(run, [doc], *flags)
        return env_of(pod_of(injected)["spec"]["initContainers"][1])["MESHLET_APP"]

    pod = workload("Pod")
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 9000}, {"containerPort": 9090}]
    assert app(pod) == "http://127.0.0.1:9000"
    assert app(pod, "--app-port", "7000") == "http://127.0.0.1:7000"
    del pod["spec"]["containers"][0]["ports"]
    assert app(pod) == "http://127.0.0.1:8080"


def test_inbound_interception_covers_every_port_or_the_declared_ones(run: Run) -> None:
    pod = workload("Pod")
    pod["spec"]["containers"].append(
        {"name": "dns", "image": "dns:1", "ports": [{"containerPort": 53, "protocol": "UDP"}]}
    )
    pod["spec"]["containers"][0]["ports"].append({"containerPort": 9090})
    (every,) = inject(run, [pod])
    assert every["spec"]["initContainers"][0]["args"] == [
        "iptables",
        "install",
        "--proxy-uid",
        "1337",
    ]
    (declared,) = inject(run, [pod], "--inbound-ports", "declared", "--app-port", "7000")
    assert declared["spec"]["initContainers"][0]["args"][4:] == [
        "--inbound-ports",
        "8080,9090,7000",
    ]


def test_the_flags_reach_the_sidecar(run: Run) -> None:
    (doc,) = inject(
        run,
        [workload("Pod")],
        "--image",
        "reg.example/meshlet:1.2",
        "--control-plane",
        "https://cp:7443",
    )
    iptables, sidecar = doc["spec"]["initContainers"]
    assert iptables["image"] == sidecar["image"] == "reg.example/meshlet:1.2"
    assert env_of(sidecar)["MESHLET_CONTROL_PLANE"] == "https://cp:7443"


def test_a_list_of_control_planes_reaches_the_sidecar_as_given(run: Run) -> None:
    replicas = "http://cp-0.cp.meshlet:7070,http://cp-1.cp.meshlet:7070"
    (doc,) = inject(run, [workload("Pod")], "--control-plane", replicas)
    _, sidecar = doc["spec"]["initContainers"]
    assert env_of(sidecar)["MESHLET_CONTROL_PLANE"] == replicas


# -- proxy mode -----------------------------------------------------------------------------------


def test_proxy_mode_points_every_app_container_at_the_sidecar(run: Run) -> None:
    pod = workload("Pod")
    pod["spec"]["containers"][0]["env"] = [
        {"name": "LOG", "value": "debug"},
        {"name": "NO_PROXY", "value": "internal.example"},
    ]
    pod["spec"]["containers"].append({"name": "worker", "image": "example/worker:1"})
    (doc,) = inject(run, [pod], "--mode", "proxy")
    assert names(doc["spec"]["initContainers"]) == ["meshlet"]
    app, worker = doc["spec"]["containers"]
    assert [var["name"] for var in app["env"]].count("NO_PROXY") == 1
    assert env_of(app) == {
        "LOG": "debug",
        "NO_PROXY": "internal.example,127.0.0.1,localhost",
        "HTTP_PROXY": "http://127.0.0.1:15001",
        "http_proxy": "http://127.0.0.1:15001",
        "no_proxy": "127.0.0.1,localhost",
    }
    assert env_of(worker) == {
        "HTTP_PROXY": "http://127.0.0.1:15001",
        "http_proxy": "http://127.0.0.1:15001",
        "NO_PROXY": "127.0.0.1,localhost",
        "no_proxy": "127.0.0.1,localhost",
    }


def test_proxy_mode_leaves_a_proxy_of_the_app_own_and_says_so(run: Run) -> None:
    pod = workload("Pod")
    pod["spec"]["containers"][0]["env"] = [{"name": "HTTP_PROXY", "value": "http://squid:3128"}]
    status, out, err = run([pod], "--mode", "proxy")
    assert status == 0
    (doc,) = yaml.safe_load_all(out)
    assert env_of(doc["spec"]["containers"][0])["HTTP_PROXY"] == "http://squid:3128"
    assert err == (
        "meshlet inject: warning: 'in.yaml' document 1 (Pod 'catalog-1'): container 'app': "
        "HTTP_PROXY set already, left as it is: its calls skip the sidecar\n"
    )


# -- idempotence and uninject --------------------------------------------------------------------


def mixed() -> list[Doc]:
    """Every kind, with init containers, volumes, env and annotations of their own, and a
    Service between them."""
    own = template(
        initContainers=[{"name": "migrate", "image": "app:1"}],
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    own["metadata"]["annotations"] = {"team": "shop", "prometheus.io/scrape": "false"}
    own["spec"]["containers"][0]["env"] = [
        {"name": "NO_PROXY", "value": "internal.example"},
        {"name": "LOG", "value": "debug"},
    ]
    bare = template()
    del bare["metadata"]  # (a Job's template needs none)
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "catalog"}}
    return [
        *(workload(kind, copy.deepcopy(own)) for kind in KINDS),
        service,
        workload("Job", bare),
        workload("Deployment"),
    ]


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_injecting_its_own_output_changes_nothing(run: Run, mode: str) -> None:
    status, once, _ = run(mixed(), "--mode", mode)
    assert status == 0
    status, twice, _ = run(once, "--mode", mode)
    assert (status, twice) == (0, once)


def test_injecting_again_with_other_flags_replaces_the_old_parts(run: Run) -> None:
    _, iptables, _ = run(mixed())
    _, proxy, _ = run(mixed(), "--mode", "proxy", "--image", "meshlet:2")
    assert run(iptables, "--mode", "proxy", "--image", "meshlet:2")[1] == proxy
    assert run(proxy)[1] == iptables


@pytest.mark.parametrize("mode", ["iptables", "proxy"])
def test_uninject_gives_the_input_back(run: Run, mode: str) -> None:
    docs = mixed()
    injected = inject(run, docs, "--mode", mode)
    assert injected != docs
    assert inject(run, injected, "--uninject") == docs
    assert inject(run, docs, "--uninject") == docs  # (nothing injected: nothing to take out)


def test_uninject_keeps_what_the_app_set_like_inject_does(run: Run) -> None:
    pod = workload("Pod")
    pod["spec"]["containers"][0]["env"] = [
        {"name": "NO_PROXY", "value": "127.0.0.1,localhost"},
        {"name": "no_proxy", "value": ""},
        {"name": "HTTP_PROXY", "value": "http://squid:3128"},
    ]
    injected = inject(run, [pod], "--mode", "proxy")
    assert env_of(injected[0]["spec"]["containers"][0])["no_proxy"] == ",127.0.0.1,localhost"
    assert inject(run, injected, "--uninject") == [pod]


# -- what is read and what is left alone ----------------------------------------------------------


def test_a_directory_is_read_sorted_and_recursively(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "web").mkdir()
    files = {
        "b.yaml": [workload("Deployment")],
        "web/a.yml": [workload("Pod"), {"apiVersion": "v1", "kind": "ConfigMap"}],
        "a.yaml": [workload("Job")],
    }
    for name, docs in files.items():
        (tmp_path / name).write_text(yaml.safe_dump_all(docs))
    (tmp_path / "notes.txt").write_text("not: yaml: at: all")
    assert main([str(tmp_path)]) == 0
    out = capsys.readouterr().out
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out)]
    assert kinds == ["Job", "Deployment", "Pod", "ConfigMap"]
    assert out.count("\n---\n") == 3


@pytest.mark.parametrize("argv", [[], ["-"]])
def test_stdin_is_read_by_default(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    text = "---\n" + yaml.safe_dump(workload("Deployment")) + "---\n---\n"  # (empty ones dropped)
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(argv) == 0
    (doc,) = yaml.safe_load_all(capsys.readouterr().out)
    assert names(pod_of(doc)["spec"]["initContainers"]) == ["meshlet-iptables", "meshlet"]


def test_other_kinds_and_other_groups_pass_through_and_list_items_are_injected(
    run: Run,
) -> None:
    others: list[Doc] = [
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "catalog"}},
        {"apiVersion": "v1", "kind": "ConfigMap", "data": {"a": "1"}},
        {"apiVersion": "example.com/v1", "kind": "Deployment", "spec": {"replicas": 2}},
        {"kustomize": "no kind at all"},
    ]
    listed = {"apiVersion": "v1", "kind": "List", "items": [workload("Deployment"), others[0]]}
    out = inject(run, [*others, listed])
    assert out[:4] == others
    deployment, service = out[4]["items"]
    assert names(pod_of(deployment)["spec"]["initContainers"]) == ["meshlet-iptables", "meshlet"]
    assert service == others[0]


def test_opted_out_and_host_network_pods_are_left_alone(run: Run) -> None:
    opted_out = workload("Deployment")
    pod_of(opted_out)["metadata"]["annotations"] = {"meshlet.io/inject": "disabled"}
    host = workload("DaemonSet")
    pod_of(host)["spec"]["hostNetwork"] = True
    status, out, err = run([opted_out, host])
    assert status == 0
    assert list(yaml.safe_load_all(out)) == [opted_out, host]
    assert err == (
        "meshlet inject: warning: 'in.yaml' document 2 (DaemonSet 'catalog-1'): on the host's "
        "network, left as it is (its rules would be the node's)\n"
    )


def test_prometheus_annotations_of_the_app_own_are_left_with_a_warning(run: Run) -> None:
    pod = workload("Pod")
    pod["metadata"]["annotations"] = {"prometheus.io/scrape": "true", "prometheus.io/port": "9102"}
    status, out, err = run([pod])
    assert status == 0
    (doc,) = yaml.safe_load_all(out)
    assert doc["metadata"]["annotations"] == {**pod["metadata"]["annotations"], MARKER: "iptables"}
    assert err == (
        "meshlet inject: warning: 'in.yaml' document 1 (Pod 'catalog-1'): prometheus.io "
        "annotations of its own, left as they are: the sidecar's metrics (:15020) are not "
        "scraped through them\n"
    )


def test_what_yaml_aliases_share_is_injected_once_each(run: Run) -> None:
    text = """
apiVersion: v1
kind: Pod
metadata: {name: catalog-1, labels: {app: catalog}}
spec:
  containers:
    - {name: app, image: app:1, env: &env [{name: LOG, value: debug}]}
    - {name: worker, image: app:1, env: *env}
"""
    status, out, _ = run(text, "--mode", "proxy")
    assert status == 0
    assert "&" not in out
    (doc,) = yaml.safe_load_all(out)
    for container in doc["spec"]["containers"]:
        assert [var["name"] for var in container["env"]] == [
            "LOG",
            "HTTP_PROXY",
            "http_proxy",
            "NO_PROXY",
            "no_proxy",
        ]
        assert env_of(container)["NO_PROXY"] == "127.0.0.1,localhost"


def test_aliases_that_expand_without_end_are_refused(run: Run) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 7)]
    status, out, err = run("\n".join(lines))
    assert (status, out) == (2, "")
    assert err == (
        "meshlet inject: error: 'in.yaml' document 1: more than 1000000 nodes, its aliases "
        "expanded\n"
    )


# -- bad input ------------------------------------------------------------------------------------


def no_spec() -> str:
    broken = workload("Deployment")
    del broken["spec"]["template"]["spec"]
    return yaml.safe_dump_all([workload("Pod"), broken])


def clash() -> str:
    pod = workload("Pod")
    pod["spec"]["containers"].append({"name": "meshlet", "image": "meshlet:0.1"})
    return yaml.safe_dump(pod)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "kind: Service\n---\nkind: [Pod\n",
            "'in.yaml' document 2: not YAML: line 4, column 1: expected ',' or ']', but got "
            "'<stream end>'",
        ),
        ("- a list\n", "'in.yaml' document 1: not a mapping but list"),
        ("kind: Service\n---\njust text\n", "'in.yaml' document 2: not a mapping but str"),
        (
            no_spec(),
            "'in.yaml' document 2: Deployment 'catalog-1' has no pod spec at spec.template.spec",
        ),
        (
            yaml.safe_dump({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "\x1b[2J"}}),
            "'in.yaml' document 1: Pod '\\x1b[2J' has no pod spec at spec",
        ),
        (
            "kind: Job\napiVersion: batch/v1\nspec: {template: []}\n",
            "'in.yaml' document 1: Job (no name) has no pod spec at spec.template.spec",
        ),
        (
            yaml.safe_dump(workload("Pod", template(containers=[]))),
            "'in.yaml' document 1 (Pod 'catalog-1'): the pod spec has no containers",
        ),
        (
            clash(),
            "'in.yaml' document 1 (Pod 'catalog-1'): 'meshlet' in the pod already, without the "
            "meshlet.io/injected annotation that meshlet inject adds: rename or remove it",
        ),
        (
            yaml.safe_dump(workload("Pod", {**template(), "metadata": {"labels": {"app": "A_b"}}})),
            "'in.yaml' document 1 (Pod 'catalog-1'): 'A_b' (its label app) is not a service "
            "name (lowercase letters, digits and '-', at most 63): give --service",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(run: Run, text: str, says: str) -> None:
    assert run(text) == (2, "", f"meshlet inject: error: {says}\n")


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["missing.yaml"], "'missing.yaml': no such file or directory"),
        (["empty"], "'empty': no *.yaml or *.yml files in it"),
        (["--app-port", "0"], "--app-port: 0 is not a port (1-65535)"),
        (["--service", "Shop\n"], "--service: 'Shop\\n' is not a service name"),
        (
            ["--control-plane", "cp:7070"],
            "--control-plane: URL 1 of 1, 'cp:7070', is not http://HOST:PORT or https://HOST:PORT",
        ),
        (["--control-plane", "http://cp-0:7070,"], "--control-plane: URL 2 of 2, is empty"),
    ],
)
def test_bad_paths_and_flags_are_one_line_and_exit_2(
    argv: list[str],
    says: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("empty").mkdir()
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"meshlet inject: error: {says}")
    assert err.count("\n") == 1
