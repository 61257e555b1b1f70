"""Two pods for end-to-end interception tests: network namespaces joined by veth pairs, each
holding what a Kubernetes pod holds (an app, a real sidecar, ``meshlet iptables`` rules), and
a way to run its app's clients as a user other than the sidecar's.

The picture, one /30 per link, drawn at random in 10.200.0.0/13 for each run::

    root ns ──(root, up)── frontend ──(address, address)── catalog ──(up, root)── root ns

The pods talk to each other over their own pair; each has a pair to the root namespace (where
the control plane and the "outside" host live), and nothing else: no forwarding, no default
route, no change to the root namespace's own rules. A pod's names resolve through its hosts
file: ``ip netns exec NAME`` bind-mounts ``/etc/netns/NAME/hosts`` over ``/etc/hosts``.

Needs root, iproute2, iptables and setpriv; without them the fixture fails, saying so, rather
than skipping.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.processes import Process

MESHLET = str(Path(sys.executable).parent / "meshlet")
#: the apps' clients run as nobody, never as the sidecar's UID (root here: the venv's Python
#: lives under /root), so that the rules redirect them; with a Python any user may execute
CLIENT_UID = 65534
SYSTEM_PYTHON = "/usr/bin/python3"
#: what a pod's sidecar runs as, and so what its rules leave alone (``--proxy-uid``)
SIDECAR_UID = 0
NETNS_DIR = Path("/etc/netns")

#: a pod's app: HTTP on one port (every GET answers JSON: the app's name, the path, the peer
#: and the request's headers), TCP echo servers on others, and servers that speak first
#: (MySQL's greeting); each TCP connection is logged as ``peer PORT ADDRESS``
APP = r"""
import http.server, json, socketserver, sys, threading, time
name, web_port, echo_ports, greet_ports = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]

class Web(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = json.dumps({"app": name, "path": self.path, "peer": self.client_address[0],
                           "headers": [[k.lower(), v] for k, v in self.headers.items()]})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body.encode())
    def log_message(self, *args):
        pass

class Echo(socketserver.BaseRequestHandler):
    def handle(self):
        print(f"peer {self.server.server_address[1]} {self.client_address[0]}", flush=True)
        while data := self.request.recv(65536):
            self.request.sendall(data)

class Greet(socketserver.BaseRequestHandler):
    def handle(self):
        print(f"peer {self.server.server_address[1]} {self.client_address[0]}", flush=True)
        self.request.sendall(f"{name} speaks first\n".encode())
        self.request.recv(1)

class Tcp(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True

servers = [http.server.ThreadingHTTPServer(("0.0.0.0", web_port), Web)]
servers += [Tcp(("0.0.0.0", int(p)), Echo) for p in echo_ports.split(",") if p]
servers += [Tcp(("0.0.0.0", int(p)), Greet) for p in greet_ports.split(",") if p]
for server in servers:
    threading.Thread(target=server.serve_forever, daemon=True).start()
print("ready", flush=True)
time.sleep(300)
"""

#: an app's HTTP client: one GET, no proxy (``http.client`` reads no proxy variable), with the
#: Host header given if any; status, headers and body as JSON, or the error
HTTP_CLIENT = r"""
import http.client, json, sys
host, port, path, host_header = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
try:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", path, headers={"Host": host_header} if host_header else {})
    r = conn.getresponse()
    out = {"status": r.status, "headers": [[k.lower(), v] for k, v in r.getheaders()],
           "body": r.read().decode(errors="replace")}
except (OSError, http.client.HTTPException) as e:
    out = {"error": f"{type(e).__name__}: {e}"}
print(json.dumps(out))
"""

#: an app's TCP client: sends its bytes, reads until it has the number asked for, the end of
#: the stream or 5 s of silence; what came, and the error if any
TCP_CLIENT = r"""
import json, socket, sys
host, port, send, want = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), int(sys.argv[4])
got, error = b"", None
try:
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(send)
        while len(got) < want:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
except OSError as e:
    error = f"{type(e).__name__}: {e}"
print(json.dumps({"received": got.hex(), "error": error}))
"""

#: a GET to a loopback port in the pod, as root (the sidecar's admin port)
ADMIN_GET = r"""
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=5) as r:
    print(r.read().decode())
"""


@dataclass(frozen=True)
class Answer:
    """What an app's HTTP client got: ``status`` 0 and ``error`` when no answer came."""

    status: int
    headers: list[tuple[str, str]]
    body: Any
    """JSON when it parses, else the text"""
    error: str = ""

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name), None)


@dataclass
class Pod:
    """A network namespace standing in for a pod: ``address`` on the link to the other pod,
    ``up`` on its link to the root namespace, whose end is ``root``. Processes started here
    are its own: the teardown kills them."""

    service: str
    netns: str
    address: str
    up: str
    root: str
    logs: Path = field(repr=False)
    processes: list[Process] = field(default_factory=list, repr=False)

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command run in the pod, as root."""
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *argv: str, env: dict[str, str] | None = None) -> Process:
        """A process in the pod, as root, logging to a file; killed at the teardown."""
        process = Process(self.logs, ["ip", "netns", "exec", self.netns, *argv], env)
        self.processes.append(process)
        return process

    def as_client(self, script: str, *args: str) -> Any:
        """``script`` run as one of the app's clients (nobody, no proxy variable): its JSON."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.netns,
             "setpriv", f"--reuid={CLIENT_UID}", f"--regid={CLIENT_UID}", "--clear-groups",
             SYSTEM_PYTHON, "-c", script, *args],
            capture_output=True, text=True, timeout=30, env={"PATH": os.environ["PATH"]},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def get(self, host: str, port: int, path: str = "/", *, host_header: str = "") -> Answer:
        """The app's GET ``http://HOST:PORT/PATH``, the name resolved by the pod's hosts file;
        ``host_header`` instead of ``HOST:PORT`` if given."""
        out = self.as_client(HTTP_CLIENT, host, str(port), path, host_header)
        if "error" in out:
            return Answer(0, [], None, out["error"])
        try:
            body = json.loads(out["body"])
        except ValueError:
            body = out["body"]
        return Answer(out["status"], [(k, v) for k, v in out["headers"]], body)

    def tcp(self, host: str, port: int, send: bytes, want: int) -> bytes | str:
        """The app's TCP exchange: the ``want`` bytes it read back, or else what went wrong
        (with what did come)."""
        out = self.as_client(TCP_CLIENT, host, str(port), send.hex(), str(want))
        got = bytes.fromhex(out["received"])
        if out["error"] or len(got) < want:
            return f"{out['error'] or 'closed early'} after {got[:200]!r}"
        return got

    def iptables(self, *args: str) -> str:
        """``meshlet iptables ARGS`` in the pod."""
        done = self.run(MESHLET, "iptables", *args)
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    def admin(self, path: str) -> Any:
        """A GET on the pod's sidecar's admin port (loopback in the pod): its JSON."""
        done = self.run(SYSTEM_PYTHON, "-c", ADMIN_GET, f"http://127.0.0.1:15000{path}")
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)


def start_app(pod: Pod, *, echo: tuple[int, ...] = (), greet: tuple[int, ...] = ()) -> Process:
    """The pod's app: HTTP on 0.0.0.0:8080 (so that it can be reached without the mesh too),
    ``echo`` and ``greet`` TCP servers; run as root (its answers are not new connections)."""
    app = pod.start(
        sys.executable, "-c", APP, pod.service, "8080",
        ",".join(map(str, echo)), ",".join(map(str, greet)),
    )  # fmt: skip
    app.wait_for(re.compile("^ready$", re.M))
    return app


def start_sidecar(pod: Pod, *args: str, env: dict[str, str] | None = None) -> Process:
    """The pod's sidecar on its usual ports (the rules send traffic to 15001 and 15006), as
    root; quick to stop."""
    sidecar = pod.start(
        sys.executable, "-m", "sidecar", "--service", pod.service,
        "--state-dir", str(pod.logs / f"state-{pod.service}"),
        "--deregister-delay", "0", "--drain-timeout", "1", *args,
        env=env,
    )  # fmt: skip
    for name in ("outbound", "inbound", "admin"):
        sidecar.wait_for(re.compile(rf"{name} listening on "))
    return sidecar


def _needs(tool: str) -> None:
    if not shutil.which(tool):
        pytest.fail(f"{tool} is missing: this test needs it (and root); .ci/system-deps")


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"ip {' '.join(args)}: {done.stderr.strip()}"


def _veth(a: str | None, a_if: str, a_addr: str, b: str, b_if: str, b_addr: str) -> None:
    """A veth pair from namespace ``a`` (None: the root one) to ``b``, a /30 on it, up."""
    in_a = ("-n", a) if a else ()
    _ip(*in_a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b)
    for ns, dev, addr in ((in_a, a_if, a_addr), (("-n", b), b_if, b_addr)):
        _ip(*ns, "addr", "add", f"{addr}/30", "dev", dev)
        _ip(*ns, "link", "set", dev, "up")


@contextmanager
def two_pods(logs: Path) -> Iterator[tuple[Pod, Pod]]:
    """A frontend pod and a catalog pod, wired as the module docstring draws; the frontend's
    hosts file names the catalog pod ``catalog`` and the root namespace's end of its own link
    ``outside`` (a host the mesh does not know). At the end: their processes killed, the
    namespaces, links and hosts files gone."""
    for tool in ("ip", "iptables", "iptables-restore", "setpriv", SYSTEM_PYTHON):
        _needs(tool)
    if os.geteuid() != 0:
        pytest.fail("this test needs root: it makes network namespaces and nat rules")
    tag = secrets.token_hex(3)
    net = f"10.{random.randrange(200, 208)}.{random.randrange(256)}.{random.randrange(0, 256, 16)}"
    prefix, base = net.rsplit(".", 1)[0], int(net.rsplit(".", 1)[1])

    def at(n: int) -> str:
        return f"{prefix}.{base + n}"

    frontend = Pod("frontend", f"meshlet-fe-{tag}", at(1), at(6), at(5), logs)
    catalog = Pod("catalog", f"meshlet-cat-{tag}", at(2), at(10), at(9), logs)
    made_dir = not NETNS_DIR.exists()
    made: list[Pod] = []
    try:
        for pod in (frontend, catalog):
            done = subprocess.run(
                ["ip", "netns", "add", pod.netns], capture_output=True, text=True, timeout=30
            )
            if done.returncode != 0:
                pytest.fail(f"cannot create a network namespace: {done.stderr.strip()}")
            made.append(pod)
            _ip("-n", pod.netns, "link", "set", "lo", "up")
        _veth(frontend.netns, f"ml{tag}fc", frontend.address, catalog.netns, f"ml{tag}cf",
              catalog.address)  # fmt: skip
        _veth(None, f"ml{tag}rf", frontend.root, frontend.netns, f"ml{tag}fr", frontend.up)
        _veth(None, f"ml{tag}rc", catalog.root, catalog.netns, f"ml{tag}cr", catalog.up)
        # the control plane listens on the frontend link's root end: the catalog pod's way there
        _ip("-n", catalog.netns, "route", "add", f"{frontend.root}/32", "via", catalog.root)
        names = {"catalog": catalog.address, "outside": frontend.root}
        (NETNS_DIR / frontend.netns).mkdir(parents=True)
        (NETNS_DIR / frontend.netns / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{a} {n}\n" for n, a in names.items())
        )
        (NETNS_DIR / frontend.netns / "hosts").chmod(0o644)
        yield frontend, catalog
    finally:
        # every process first: a socket closed while its peer's namespace is already gone
        # retransmits its FIN for minutes, and keeps its own namespace (and links) alive
        for process in [p for pod in made for p in pod.processes]:
            process.kill()
        for pod in made:
            subprocess.run(["ip", "netns", "del", pod.netns], capture_output=True, timeout=30)
            shutil.rmtree(NETNS_DIR / pod.netns, ignore_errors=True)
        if made_dir and NETNS_DIR.exists() and not any(NETNS_DIR.iterdir()):
            NETNS_DIR.rmdir()
        for end in (f"ml{tag}rf", f"ml{tag}rc"):  # as a rule gone with their namespaces
            subprocess.run(["ip", "link", "del", end], capture_output=True, timeout=30)
