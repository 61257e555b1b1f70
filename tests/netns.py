"""A network namespace joined to this one by a veth pair, for tests that need a peer that is
not loopback, or a pod's own network stack (its nat table: ``meshlet iptables``).

Needs root (CAP_SYS_ADMIN, CAP_NET_ADMIN) and iproute2; without them the fixture fails, saying
so, rather than skipping: a skipped test would pass the rule it exists to check.
"""

from __future__ import annotations

import json
import random
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

#: runs inside the namespace: one request, its status and body as JSON on stdout
CLIENT = """
import json, sys, urllib.error, urllib.request
method, url, headers, body = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
req = urllib.request.Request(url, data=body.encode() if body else None, method=method,
                             headers=headers)
opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
try:
    with opener.open(req, timeout=5) as r:
        status, raw = r.status, r.read()
except urllib.error.HTTPError as e:
    status, raw = e.code, e.read()
print(json.dumps({"status": status, "body": raw.decode(errors="replace")}))
"""


def ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)


@dataclass(frozen=True)
class Netns:
    """A namespace ``name`` whose only way out is a veth pair: ``host`` is this host's end,
    ``peer`` the namespace's (a /30)."""

    name: str
    host: str
    peer: str

    def run(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        """A command run inside the namespace."""
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def http(
        self, method: str, url: str, *, headers: dict[str, str] | None = None, body: str = ""
    ) -> tuple[int, Any]:
        """A request sent from inside the namespace: status and body (JSON when it is)."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", CLIENT,
             method, url, json.dumps(headers or {}), body],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answer = json.loads(done.stdout)
        try:
            return answer["status"], json.loads(answer["body"])
        except ValueError:
            return answer["status"], answer["body"]


@pytest.fixture
def netns() -> Iterator[Netns]:
    tag = secrets.token_hex(3)
    name, host_if, peer_if = f"meshlet-t-{tag}", f"mlh{tag}", f"mlp{tag}"
    base = f"10.{random.randrange(200, 255)}.{random.randrange(256)}.{random.randrange(0, 256, 4)}"
    prefix = base.rsplit(".", 1)[0]
    last = int(base.rsplit(".", 1)[1])
    host, peer = f"{prefix}.{last + 1}", f"{prefix}.{last + 2}"
    try:
        made = ip("netns", "add", name)
    except FileNotFoundError:
        pytest.fail("the ip command (iproute2) is missing: this test needs it, and root")
    if made.returncode != 0:
        pytest.fail(
            f"cannot create a network namespace ({made.stderr.strip()}): this test needs root "
            "(CAP_SYS_ADMIN and CAP_NET_ADMIN) to put a non-loopback peer in front of the "
            "admin port"
        )
    try:
        for step in (
            ("link", "add", host_if, "type", "veth", "peer", "name", peer_if, "netns", name),
            ("addr", "add", f"{host}/30", "dev", host_if),
            ("link", "set", host_if, "up"),
            ("-n", name, "addr", "add", f"{peer}/30", "dev", peer_if),
            ("-n", name, "link", "set", peer_if, "up"),
            ("-n", name, "link", "set", "lo", "up"),
        ):
            done = ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr.strip()}"
        yield Netns(name, host, peer)
    finally:
        ip("netns", "del", name)  # takes the namespace's end of the pair, and so the pair
        if ip("link", "show", host_if).returncode == 0:
            ip("link", "del", host_if)
    assert name not in ip("netns", "list").stdout
