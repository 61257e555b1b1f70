"""``meshlet inject``: Kubernetes YAML with the mesh added to its workloads' pods, for
``kubectl apply -f -`` (``linkerd inject``, ``istioctl kube-inject``); ``--uninject`` takes it
out again.

Reads files, directories (every ``*.yaml`` and ``*.yml`` under them, sorted) or stdin (``-``)
and writes every document to stdout, in the order read. What a pod gets, as
``deploy/kubernetes/example-pod.yaml`` shows it (tests/meshlet/test_inject.py keeps the two
alike):

1. ``--mode iptables`` (the default): the ``meshlet-iptables`` init container, first of all,
   so that the rules are in place before any other container, init or not, opens a
   connection: nothing of the pod's traffic leaves unseen;
2. the sidecar ``meshlet``, a native sidecar (an init container with ``restartPolicy:
   Always``), right after it: the app's own init containers come next, and run with the mesh
   up (between the rules and the sidecar, their connections would be refused);
3. ``--mode proxy`` (no ``NET_ADMIN``, e.g. under the ``restricted`` Pod Security Standard):
   no rules; every app container's ``HTTP_PROXY``/``http_proxy`` names the sidecar's outbound
   listener, and ``NO_PROXY``/``no_proxy`` loopback (appended to a value the app has);
4. the token volume (the Secret ``<service>-meshlet-token``), the state volume (emptyDir),
   the Prometheus annotations, and the marker ``meshlet.io/injected: <mode>``.

Injected: Pods, Deployments, StatefulSets, DaemonSets, ReplicaSets, ReplicationControllers,
Jobs, CronJobs and the items of a ``List``; any other document is written as read, and so is
a pod template annotated ``meshlet.io/inject: disabled`` (the control plane's own) or on the
host's network (a warning: its rules would be the node's).

Idempotent: a pod template with the marker has what inject added taken out, then added again
with the flags given, so that its own output comes back byte for byte (and a new ``--image``
or ``--mode`` replaces the old). ``--uninject`` takes out just that: the app's containers,
volumes, env and annotations stay as they were (an env value or annotation equal to what
inject writes is taken for inject's, and a list or map left empty is dropped, which means the
same to the API server).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Final

import yaml

from meshlet.pods import (
    DEFAULT_CONTROL_PLANE,
    DEFAULT_IMAGE,
    MODES,
    OPT_OUT,
    InjectError,
    Options,
    UsageError,
    Warn,
    add,
    annotations_of,
    describe,
    name_of,
    pod_template,
    prune,
    show,
    strip,
)


def transform(doc: object, options: Options, uninject: bool, where: str, warn: Warn) -> object:
    """One document, injected (or uninjected) in place; the items of a List each."""
    if not isinstance(doc, dict):
        raise InjectError(f"{where}: not a mapping but {type(doc).__name__}")
    kind = doc.get("kind")
    if isinstance(kind, str) and kind.endswith("List") and isinstance(doc.get("items"), list):
        for i, item in enumerate(doc["items"]):
            transform(item, options, uninject, f"{where} item {i + 1}", warn)
        return doc
    template = pod_template(doc, where)
    if template is None:
        return doc
    where = f"{where} ({describe(doc)})"
    if uninject:
        if strip(template, where):
            prune(template)
        return doc
    if (annotations_of(template) or {}).get(OPT_OUT) == "disabled":
        return doc
    if template["spec"].get("hostNetwork") is True:
        warn(f"{where}: on the host's network, left as it is (its rules would be the node's)")
        return doc
    strip(template, where)
    add(template, options, where, name_of(doc), warn)
    return doc


#: nodes in a document, its aliases expanded (a "billion laughs" stops here)
MAX_NODES: Final = 1_000_000


def _plain(doc: object, where: str) -> object:
    """A document with nothing shared (aliases copied), so that a change shows in one place."""
    budget = [MAX_NODES]

    def copy(node: object) -> object:
        budget[0] -= 1
        if budget[0] < 0:
            raise InjectError(f"{where}: more than {MAX_NODES} nodes, its aliases expanded")
        if isinstance(node, dict):
            return {k: copy(v) for k, v in node.items()}
        if isinstance(node, list):
            return [copy(v) for v in node]
        return node

    return copy(doc)


def read(paths: Sequence[str]) -> Iterator[tuple[str, object]]:
    """(where, document) for every document of every file, in order; empty ones left out."""
    for path in paths:
        for name, text in _texts(path):
            source = f"{show(name, 200)} document"
            stream = yaml.safe_load_all(text)
            index = 0
            while True:
                index += 1
                try:
                    doc = next(stream)
                except StopIteration:
                    break
                except yaml.YAMLError as e:
                    raise InjectError(f"{source} {index}: not YAML: {_yaml_error(e)}") from None
                if doc is not None:
                    yield f"{source} {index}", _plain(doc, f"{source} {index}")


def _yaml_error(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = str(getattr(e, "problem", None) or e)
    at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return at + "".join(c if c.isprintable() else " " for c in problem[:100])


def _texts(path: str) -> Iterator[tuple[str, str]]:
    if path == "-":
        try:
            text = sys.stdin.read()
        except UnicodeDecodeError:
            raise UsageError("<stdin>: not UTF-8") from None
        yield "<stdin>", text
        return
    where = Path(path)
    if where.is_dir():
        files = sorted(p for p in where.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())
        if not files:
            raise UsageError(f"{show(path, 200)}: no *.yaml or *.yml files in it")
    elif where.is_file():
        files = [where]
    else:
        raise UsageError(f"{show(path, 200)}: no such file or directory")
    for file in files:
        try:
            yield str(file), file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UsageError(
                f"{show(str(file), 200)}: cannot be read ({type(e).__name__})"
            ) from None


class _Dumper(yaml.SafeDumper):
    """safe_dump's, writing a repeated object out again rather than as an alias."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def dump(docs: Sequence[object]) -> str:
    return yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, allow_unicode=True)


def parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Add the meshlet sidecar to the workloads in Kubernetes YAML (or take it out: "
        "--uninject) and write the YAML to stdout, e.g. for kubectl apply -f -.",
    )
    p.add_argument(
        "paths", nargs="*", default=["-"], metavar="PATH", help="file, directory or - (stdin)"
    )
    p.add_argument("--uninject", action="store_true", help="take out what inject added")
    p.add_argument(
        "--mode",
        choices=MODES,
        default="iptables",
        help="intercept with an iptables init container (NET_ADMIN), or set the app's "
        "HTTP_PROXY (%(default)s)",
    )
    p.add_argument("--image", default=DEFAULT_IMAGE, help="the meshlet image (%(default)s)")
    p.add_argument("--control-plane", default=DEFAULT_CONTROL_PLANE, help="(%(default)s)")
    p.add_argument("--service", help="service name (the app label, else the workload's name)")
    p.add_argument(
        "--app-port", type=int, help="the app's port (its first containerPort, else 8080)"
    )
    p.add_argument(
        "--inbound-ports",
        choices=("all", "declared"),
        default="all",
        help="intercept inbound every port but the sidecar's, or the containerPorts (%(default)s)",
    )
    return p


def main(argv: Sequence[str], prog: str = "meshlet inject") -> int:
    args = parser(prog).parse_args(argv)

    def warn(message: str) -> None:
        print(f"{prog}: warning: {message}", file=sys.stderr)

    try:
        options = Options(
            mode=args.mode,
            image=args.image,
            control_plane=args.control_plane,
            service=args.service,
            app_port=args.app_port,
            inbound_ports=args.inbound_ports,
        )
        docs = [
            transform(doc, options, args.uninject, where, warn) for where, doc in read(args.paths)
        ]
    except (UsageError, InjectError) as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(dump(docs))
    return 0
