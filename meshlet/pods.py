"""What ``meshlet inject`` puts into a pod template and takes out again: the init containers,
the sidecar, the volumes, the proxy environment, the annotations and the marker
(``inject`` reads and writes the YAML around them; the order and the reasons are its
docstring's). ``deploy/kubernetes/example-pod.yaml`` shows the result, and
tests/meshlet/test_inject.py keeps the two alike.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from control_plane.wire import SERVICE_NAME
from meshlet.iptables import DEFAULT_PROXY_UID
from sidecar.config import control_plane_urls
from sidecar.errors import ConfigError

Doc = dict[str, Any]
Warn = Callable[[str], None]

MARKER: Final = "meshlet.io/injected"
OPT_OUT: Final = "meshlet.io/inject"  # "disabled": leave this pod template alone
MODES: Final = ("iptables", "proxy")
SIDECAR, IPTABLES = "meshlet", "meshlet-iptables"
TOKEN_VOLUME, STATE_VOLUME = "meshlet-token", "meshlet-state"
OUTBOUND_PORT, INBOUND_PORT, METRICS_PORT = 15001, 15006, 15020
DEFAULT_CONTROL_PLANE: Final = "http://meshlet-control-plane.meshlet:7070"
DEFAULT_IMAGE: Final = "meshlet:dev"
DEFAULT_APP_PORT: Final = 8080
PROXY_URL: Final = f"http://127.0.0.1:{OUTBOUND_PORT}"
NO_PROXY: Final = "127.0.0.1,localhost"
PROMETHEUS: Final = {
    "prometheus.io/scrape": "true",
    "prometheus.io/port": str(METRICS_PORT),
    "prometheus.io/path": "/metrics",
}
#: where each kind keeps its pod template: (API group, keys from the document to the template;
#: a Pod is its own)
TEMPLATES: Final[dict[str, tuple[str, tuple[str, ...]]]] = {
    "Pod": ("", ()),
    "ReplicationController": ("", ("spec", "template")),
    "Deployment": ("apps", ("spec", "template")),
    "StatefulSet": ("apps", ("spec", "template")),
    "DaemonSet": ("apps", ("spec", "template")),
    "ReplicaSet": ("apps", ("spec", "template")),
    "Job": ("batch", ("spec", "template")),
    "CronJob": ("batch", ("spec", "jobTemplate", "spec", "template")),
}


class UsageError(Exception):
    """A flag or path is not usable: the message names it."""


class InjectError(Exception):
    """A document cannot be injected: the message names the file, the document and why."""


@dataclass(frozen=True)
class Options:
    """What goes into every pod; ``None``: taken from each workload."""

    mode: str = "iptables"
    image: str = DEFAULT_IMAGE
    control_plane: str = DEFAULT_CONTROL_PLANE
    service: str | None = None
    app_port: int | None = None
    """the app's port on loopback, where inbound calls go (None: its first containerPort)"""
    inbound_ports: str = "all"
    """intercepted inbound: ``all`` ports but the sidecar's, or the ``declared`` containerPorts"""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"--mode: {self.mode[:20]!r} is not one of {', '.join(MODES)}")
        if not self.image.strip():
            raise UsageError("--image: must not be empty")
        try:
            if not control_plane_urls(self.control_plane):
                raise UsageError("--control-plane: must not be empty")
        except ConfigError as e:
            raise UsageError(f"--control-plane: {e.message}") from None
        if self.service is not None and not SERVICE_NAME.fullmatch(self.service):
            raise UsageError(f"--service: {show(self.service)} is not a service name ({_RULE})")
        if self.app_port is not None and not 0 < self.app_port < 65536:
            raise UsageError(f"--app-port: {self.app_port} is not a port (1-65535)")
        if self.inbound_ports not in ("all", "declared"):
            raise UsageError(f"--inbound-ports: {self.inbound_ports[:20]!r} is not all or declared")


_RULE = "lowercase letters, digits and '-', at most 63"


def show(value: object, limit: int = 60) -> str:
    """A client's string for a message: quoted, escaped, cut short."""
    text = value if isinstance(value, str) else str(value)
    return repr(text[:limit]) + ("..." if len(text) > limit else "")


# -- what inject adds --------------------------------------------------------------------------


def iptables_container(options: Options, inbound: list[int]) -> Doc:
    args = ["iptables", "install", "--proxy-uid", str(DEFAULT_PROXY_UID)]
    if inbound:
        args += ["--inbound-ports", ",".join(map(str, inbound))]
    return {
        "name": IPTABLES,
        "image": options.image,
        "args": args,
        "securityContext": {
            "runAsUser": 0,
            "runAsNonRoot": False,
            "allowPrivilegeEscalation": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    }


def sidecar_container(options: Options, service: str, app_port: int) -> Doc:
    readyz = {"httpGet": {"path": "/readyz", "port": METRICS_PORT}}
    return {
        "name": SIDECAR,
        "image": options.image,
        "restartPolicy": "Always",
        "args": ["sidecar"],
        "env": [
            {"name": "MESHLET_SERVICE", "value": service},
            {"name": "MESHLET_CONTROL_PLANE", "value": options.control_plane},
            {"name": "MESHLET_TOKEN_FILE", "value": "/var/run/secrets/meshlet/token"},
            {"name": "MESHLET_APP", "value": f"http://127.0.0.1:{app_port}"},
            {"name": "MESHLET_METRICS_LISTEN", "value": f"0.0.0.0:{METRICS_PORT}"},
            {"name": "MESHLET_STATE_DIR", "value": "/var/lib/meshlet"},
            {"name": "MESHLET_ADVERTISE", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            {
                "name": "MESHLET_NAMESPACE",
                "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}},
            },
        ],
        "ports": [
            {"name": "inbound", "containerPort": INBOUND_PORT},
            {"name": "metrics", "containerPort": METRICS_PORT},
        ],
        "startupProbe": {**readyz, "periodSeconds": 1, "failureThreshold": 120},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": METRICS_PORT}},
        "securityContext": {
            "runAsUser": DEFAULT_PROXY_UID,
            "runAsGroup": DEFAULT_PROXY_UID,
            "runAsNonRoot": True,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [
            {"name": TOKEN_VOLUME, "mountPath": "/var/run/secrets/meshlet", "readOnly": True},
            {"name": STATE_VOLUME, "mountPath": "/var/lib/meshlet"},
        ],
    }


def volumes(service: str) -> list[Doc]:
    return [
        {"name": TOKEN_VOLUME, "secret": {"secretName": f"{service}-meshlet-token"}},
        {"name": STATE_VOLUME, "emptyDir": {}},
    ]


# -- one pod template ----------------------------------------------------------------------------


def _child(parent: Doc, key: str, empty: dict[str, Any] | list[Any], before: str) -> Any:
    """``parent[key]``, made ``empty`` when absent, then placed before ``before`` (as
    ``initContainers`` before ``containers`` and ``metadata`` before ``spec`` read)."""
    if parent.get(key) is None:
        items = [(k, v) for k, v in parent.items() if k != key]
        parent.clear()
        for k, v in items:
            if k == before:
                parent[key] = empty
            parent[k] = v
        parent.setdefault(key, empty)
    return parent[key]


def _mapping(parent: Doc, key: str, where: str, *, before: str = "") -> Doc:
    value = _child(parent, key, {}, before)
    if not isinstance(value, dict):
        raise InjectError(f"{where}: {key} is not a mapping")
    return value


def _list(parent: Doc, key: str, where: str, *, before: str = "") -> list[Doc]:
    value = _child(parent, key, [], before)
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise InjectError(f"{where}: {key} is not a list of mappings")
    return value


def strip(template: Doc, where: str) -> bool:
    """Take out the containers, volumes and env inject added to a pod template with the marker,
    and the marker; False: it has none, and nothing changed. The Prometheus annotations stay,
    and lists left empty, for inject to find again in place (uninject: ``prune``)."""
    annotations = annotations_of(template)
    if annotations is None or MARKER not in annotations:
        return False
    mode = annotations.pop(MARKER)
    spec = template["spec"]
    inits = _list(spec, "initContainers", where)
    inits[:] = [c for c in inits if c.get("name") not in (IPTABLES, SIDECAR)]
    vols = _list(spec, "volumes", where)
    vols[:] = [v for v in vols if v.get("name") not in (TOKEN_VOLUME, STATE_VOLUME)]
    if mode == "proxy":
        for i, container in enumerate(_list(spec, "containers", where)):
            if container.get("env") and not _strip_env(
                _list(container, "env", f"{where}: containers[{i}]")
            ):
                del container["env"]  # (inject's own, or the mode it is injected in now has none)
    return True


def _strip_env(env: list[Doc]) -> list[Doc]:
    kept = []
    for var in env:
        name, value = var.get("name"), var.get("value")
        if name in ("HTTP_PROXY", "http_proxy") and value == PROXY_URL:
            continue
        if name in ("NO_PROXY", "no_proxy") and isinstance(value, str):
            if value == NO_PROXY:
                continue
            var["value"] = value.removesuffix(f",{NO_PROXY}")
        kept.append(var)
    env[:] = kept
    return env


def prune(template: Doc) -> None:
    """After ``strip``, for uninject: drop the Prometheus annotations (when they are inject's)
    and the lists and maps left empty."""
    annotations = annotations_of(template) or {}
    if all(annotations.get(k) == v for k, v in PROMETHEUS.items()):
        for key in PROMETHEUS:
            del annotations[key]
    spec, metadata = template["spec"], template.get("metadata")
    for parent, key in [
        (spec, "initContainers"),
        (spec, "volumes"),
        *((c, "env") for c in spec.get("containers") or [] if isinstance(c, dict)),
        (metadata if isinstance(metadata, dict) else {}, "annotations"),
        (template, "metadata"),
    ]:
        if key in parent and parent[key] in ([], {}):
            del parent[key]


def add(template: Doc, options: Options, where: str, name: object, warn: Warn) -> None:
    """Put the mesh into a pod template that has none of it (strip it first); ``name``: the
    workload's, the service's name when no flag or label gives one."""
    metadata = _mapping(template, "metadata", where, before="spec")
    spec = template["spec"]
    containers = _list(spec, "containers", where)
    if not containers:
        raise InjectError(f"{where}: the pod spec has no containers")
    inits = _list(spec, "initContainers", where, before="containers")
    vols = _list(spec, "volumes", where)
    taken = {c.get("name") for c in inits + containers} & {IPTABLES, SIDECAR}
    taken |= {v.get("name") for v in vols} & {TOKEN_VOLUME, STATE_VOLUME}
    if taken:
        names = ", ".join(show(t) for t in sorted(map(str, taken)))
        raise InjectError(
            f"{where}: {names} in the pod already, without the {MARKER} annotation that "
            "meshlet inject adds: rename or remove it"
        )
    service = _service(options, metadata, name, where)
    ports = [_ports(c, f"{where}: containers[{i}]") for i, c in enumerate(containers)]
    app_port = options.app_port or next(iter(ports[0]), DEFAULT_APP_PORT)
    ours = [sidecar_container(options, service, app_port)]
    if options.mode == "iptables":
        declared = list(dict.fromkeys(p for each in ports for p in each))
        if options.inbound_ports == "all" or not declared:
            declared = []
        elif app_port not in declared:
            declared.append(app_port)
        ours.insert(0, iptables_container(options, declared))
    else:
        for i, container in enumerate(containers):
            env = _list(container, "env", f"{where}: containers[{i}]")
            _proxy_env(env, f"{where}: container {show(container.get('name'))}", warn)
    inits[:0] = ours
    vols += volumes(service)
    annotations = _mapping(metadata, "annotations", where)
    if not any(key in annotations for key in PROMETHEUS):
        annotations.update(PROMETHEUS)
    elif any(annotations.get(k) != v for k, v in PROMETHEUS.items()):
        warn(
            f"{where}: prometheus.io annotations of its own, left as they are: the sidecar's "
            f"metrics (:{METRICS_PORT}) are not scraped through them"
        )
    annotations[MARKER] = options.mode


def annotations_of(template: Doc) -> Doc | None:
    metadata = template.get("metadata")
    annotations = metadata.get("annotations") if isinstance(metadata, dict) else None
    return annotations if isinstance(annotations, dict) else None


def _proxy_env(env: list[Doc], where: str, warn: Warn) -> None:
    """The app's calls through the sidecar's outbound listener, all but loopback's."""
    have = {var.get("name"): var for var in env}
    for name in ("HTTP_PROXY", "http_proxy"):
        if name not in have:
            env.append({"name": name, "value": PROXY_URL})
        elif have[name].get("value") != PROXY_URL:
            warn(f"{where}: {name} set already, left as it is: its calls skip the sidecar")
    for name in ("NO_PROXY", "no_proxy"):
        if name not in have:
            env.append({"name": name, "value": NO_PROXY})
        elif isinstance(have[name].get("value"), str):
            have[name]["value"] += f",{NO_PROXY}"
        else:
            warn(f"{where}: {name} is not a value (valueFrom?), left without {NO_PROXY}")


def _service(options: Options, metadata: Doc, name: object, where: str) -> str:
    """The flag's, else the pod template's app label, else the workload's name."""
    if options.service is not None:
        return options.service
    labels = metadata.get("labels")
    labels = labels if isinstance(labels, dict) else {}
    found = [
        (labels.get("app.kubernetes.io/name"), "label app.kubernetes.io/name"),
        (labels.get("app"), "label app"),
        (name, "metadata.name"),
    ]
    service, source = next(((s, src) for s, src in found if s), (None, ""))
    if service is None:
        raise InjectError(f"{where}: no label app and no metadata.name: give --service")
    if not isinstance(service, str) or not SERVICE_NAME.fullmatch(service):
        raise InjectError(
            f"{where}: {show(service)} (its {source}) is not a service name ({_RULE}): "
            "give --service"
        )
    return service


def _ports(container: Doc, where: str) -> list[int]:
    """A container's TCP containerPorts."""
    if container.get("ports") is None:
        return []
    ports = []
    for port in _list(container, "ports", where):
        number = port.get("containerPort")
        if isinstance(number, bool) or not isinstance(number, int) or not 0 < number < 65536:
            raise InjectError(f"{where}: containerPort {show(number)} is not a port (1-65535)")
        if port.get("protocol", "TCP") == "TCP":
            ports.append(number)
    return ports


# -- documents -----------------------------------------------------------------------------------


def pod_template(doc: Doc, where: str) -> Doc | None:
    """The mapping holding a workload's pod ``metadata`` and ``spec`` (a Pod: itself); None
    for any other kind (or a kind of that name from another API group)."""
    kind = doc.get("kind")
    if not isinstance(kind, str) or kind not in TEMPLATES:
        return None
    group, path = TEMPLATES[kind]
    api = doc.get("apiVersion")
    if isinstance(api, str) and api.rpartition("/")[0] != group:
        return None
    node: object = doc
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    if not isinstance(node, dict) or not isinstance(node.get("spec"), dict):
        at = ".".join((*path, "spec"))
        raise InjectError(f"{where}: {describe(doc)} has no pod spec at {at}")
    return node


def name_of(doc: Doc) -> object:
    metadata = doc.get("metadata")
    return metadata.get("name") if isinstance(metadata, dict) else None


def describe(doc: Doc) -> str:
    name = name_of(doc)
    return f"{doc.get('kind')} {show(name) if name is not None else '(no name)'}"
