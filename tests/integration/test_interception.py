"""``meshlet iptables`` at work in a pod's network namespace (``tests.netns``): with the rules
installed, TCP the pod opens reaches the outbound listener and TCP arriving for it the inbound
one, each able to read the original destination (``SO_ORIGINAL_DST``); the sidecar's own UID,
loopback, excluded ports and the sidecar's own ports go straight through; uninstalling
restores direct traffic.

The listeners here are stand-ins that answer with the original destination they read: what
the sidecar does with it is tested with the sidecar. Needs root, iproute2 and iptables.
"""

from __future__ import annotations

import shutil
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import Netns

pytestmark = pytest.mark.slow

MESHLET = str(Path(sys.executable).parent / "meshlet")
#: the namespace's clients run as the sidecar's UID too: a Python it may execute
SYSTEM_PYTHON = "/usr/bin/python3"

#: the sidecar's listeners, standing in: each answers one line, its name and the connection's
#: original destination
STAND_IN = """
import asyncio, socket, struct
SO_ORIGINAL_DST = 80
def original(sock):
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return "none"
    return f"{socket.inet_ntoa(raw[4:8])}:{struct.unpack('!H', raw[2:4])[0]}"
async def main():
    def serve(name):
        async def answer(reader, writer):
            writer.write(f"{name} {original(writer.get_extra_info('socket'))}\\n".encode())
            await writer.drain()
            writer.close()
        return answer
    for name, host, port in (("outbound", "127.0.0.1", 15001), ("inbound", "0.0.0.0", 15006),
                             ("metrics", "0.0.0.0", 15020)):
        await asyncio.start_server(serve(name), host, port)
    print("ready", flush=True)
    await asyncio.sleep(120)
asyncio.run(main())
"""
#: a client: connects, prints the line it is answered, or the error
CLIENT = """
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5) as s:
        print(s.makefile().readline().strip())
except OSError as e:
    print(f"error {type(e).__name__}")
"""


class _Direct(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        port = self.request.getsockname()[1]
        self.request.sendall(f"direct {port}\n".encode())


@pytest.fixture
def pod(netns: Netns) -> Iterator[Netns]:
    """The namespace, with ``meshlet iptables`` available and the stand-in listeners running;
    the rules are removed afterwards, whatever happened."""
    if not shutil.which("iptables"):
        pytest.fail("iptables is missing: this test needs it (.ci/system-deps installs it)")
    stand_in = subprocess.Popen(
        ["ip", "netns", "exec", netns.name, sys.executable, "-c", STAND_IN],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert stand_in.stdout is not None
    try:
        assert stand_in.stdout.readline().strip() == "ready"
        yield netns
    finally:
        netns.run(MESHLET, "iptables", "uninstall")
        stand_in.kill()
        stand_in.wait(10)
        stand_in.stdout.close()


@pytest.fixture
def host_servers(netns: Netns) -> Iterator[tuple[int, int]]:
    """Two servers on this host's end of the pair, answering ``direct PORT``."""
    servers = [socketserver.ThreadingTCPServer((netns.host, 0), _Direct) for _ in range(2)]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield servers[0].socket.getsockname()[1], servers[1].socket.getsockname()[1]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def from_pod(pod: Netns, host: str, port: int, *, uid: int | None = None) -> str:
    as_uid = (
        [] if uid is None else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    )
    done = pod.run(*as_uid, SYSTEM_PYTHON, "-c", CLIENT, host, str(port))
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def to_pod(pod: Netns, port: int) -> str:
    try:
        with socket.create_connection((pod.peer, port), timeout=5) as s:
            return s.makefile().readline().strip()
    except OSError as e:
        return f"error {type(e).__name__}"


def meshlet_iptables(pod: Netns, *args: str) -> str:
    done = pod.run(MESHLET, "iptables", *args)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_the_rules_send_a_pods_tcp_through_its_sidecar(
    pod: Netns, host_servers: tuple[int, int]
) -> None:
    port, excluded = host_servers
    assert from_pod(pod, pod.host, port) == f"direct {port}"  # before: nothing in the way

    assert meshlet_iptables(pod, "install", "--exclude-outbound-ports", str(excluded)) == (
        "installed"
    )
    # outbound: to the outbound listener, which can tell where it was going
    assert from_pod(pod, pod.host, port) == f"outbound {pod.host}:{port}"
    assert from_pod(pod, pod.host, excluded) == f"direct {excluded}"
    assert from_pod(pod, pod.host, port, uid=1337) == f"direct {port}"  # the sidecar's own
    assert from_pod(pod, "127.0.0.1", 15020).startswith("metrics ")  # loopback: as it was
    # inbound: any port to the inbound listener, the sidecar's own ports to themselves
    assert to_pod(pod, 8080) == f"inbound {pod.peer}:8080"
    assert to_pod(pod, 15020).startswith("metrics ")

    assert meshlet_iptables(pod, "install", "--exclude-outbound-ports", str(excluded)) == (
        "already installed: nothing changed"
    )
    rules = meshlet_iptables(pod, "show").splitlines()
    assert rules.count("-A OUTPUT -p tcp -j MESHLET_OUTPUT") == 1

    assert meshlet_iptables(pod, "uninstall") == "uninstalled"
    assert meshlet_iptables(pod, "show") == "no meshlet rules"
    assert "MESHLET" not in pod.run("iptables-save", "-t", "nat").stdout
    assert from_pod(pod, pod.host, port) == f"direct {port}"
    assert to_pod(pod, 8080) == "error ConnectionRefusedError"  # nothing listens there
    assert meshlet_iptables(pod, "uninstall") == "no meshlet rules: nothing to do"


def test_only_the_listed_inbound_ports_are_redirected(pod: Netns) -> None:
    meshlet_iptables(pod, "install", "--inbound-ports", "8080")
    assert to_pod(pod, 8080) == f"inbound {pod.peer}:8080"
    assert to_pod(pod, 8081) == "error ConnectionRefusedError"
    # a changed flag rewrites the rules in place: one jump each, the new port list
    assert meshlet_iptables(pod, "install", "--inbound-ports", "8081") == "installed"
    assert to_pod(pod, 8081) == f"inbound {pod.peer}:8081"
    assert to_pod(pod, 8080) == "error ConnectionRefusedError"
    rules = meshlet_iptables(pod, "show").splitlines()
    assert rules.count("-A PREROUTING -p tcp -j MESHLET_INBOUND") == 1
