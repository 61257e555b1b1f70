"""Real meshlet processes for integration tests: free ports, logs in a file."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

LISTENING = re.compile(r"listening on (https?://\S+)")


def free_port() -> int:
    """A loopback port nobody listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def eventually(check: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    """Seconds until ``check()`` held; fails after ``timeout``."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if check():
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"not within {timeout}s: {what}")


class Process:
    """A child process whose log goes to a file; ``wait_for`` reads it."""

    def __init__(self, log_dir: Path, argv: list[str], env: dict[str, str] | None = None) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = log_dir / f"{Path(argv[2]).name}-{time.monotonic_ns()}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, pattern: re.Pattern[str], timeout: float = 15.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.search(self.log())
            if found:
                return found
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"no {pattern.pattern!r} within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        """Whatever state it is in: gone (for test teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(15)
        self._log.close()

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")


#: the admin token of control planes the tests start, unless a test gives another
ADMIN_TOKEN = "test-admin-token"


class ControlPlane(Process):
    """A control plane with tokens on, as a user runs one: ``admin_token`` (given in the
    environment, never on the command line) unless it is ""."""

    def __init__(
        self,
        log_dir: Path,
        *args: str,
        env: dict[str, str] | None = None,
        admin_token: str = ADMIN_TOKEN,
        ca_file: str = "",
    ) -> None:
        """``ca_file``: the CA that signed its ``--tls-cert``, for ``call``."""
        argv = [sys.executable, "-m", "control_plane", "--listen", "127.0.0.1:0", *args]
        self.admin_token = admin_token
        self.tls = ssl.create_default_context(cafile=ca_file) if ca_file else None
        super().__init__(log_dir, argv, {"MESHLET_ADMIN_TOKEN": admin_token, **(env or {})})
        try:
            self.url = self.wait_for(LISTENING).group(1)
        except BaseException:
            self.kill()
            raise

    def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> tuple[int, Any]:
        """A REST call with the admin token, or ``token`` ("" for none)."""
        token = self.admin_token if token is None else token
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        return http(method, self.url + path, body, {**auth, **(headers or {})}, self.tls)

    def mint(self, service: str) -> str:
        """A new service token's secret."""
        status, body = self.call("POST", "/v1/tokens", {"service": service})
        assert status == 201, body
        secret: str = body["secret"]
        return secret

    def sidecar_env(self, service: str) -> dict[str, str]:
        """The environment a sidecar of ``service`` connects with: a token of its own."""
        return {"MESHLET_TOKEN": self.mint(service)}


class Sidecar(Process):
    def __init__(self, log_dir: Path, *args: str, env: dict[str, str] | None = None) -> None:
        argv = [
            sys.executable,
            "-m",
            "sidecar",
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            *args,
        ]
        super().__init__(log_dir, argv, env)
        try:
            self.ports = {
                name: int(self.wait_for(re.compile(rf"{name} listening on [\d.]+:(\d+)")).group(1))
                for name in ("outbound", "inbound", "admin", "metrics")
            }
        except BaseException:
            self.kill()
            raise

    def admin(self, path: str, method: str = "GET") -> tuple[int, Any]:
        """A call to the admin port; a POST sends an empty JSON object, as the port asks."""
        body: dict[str, Any] | None = {} if method != "GET" else None
        return http(method, f"http://127.0.0.1:{self.ports['admin']}{path}", body)


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    tls: ssl.SSLContext | None = None,
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    all_headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(
        url, data=data, method=method, headers={**all_headers, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(req, timeout=10, context=tls) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        return e.code, json.loads(raw) if raw else None


class Backend(Process):
    """``tests/backend.py`` in its own process: kill -9 and SIGSTOP it, SIGUSR1 makes it fail."""

    def __init__(self, log_dir: Path, name: str, *args: str) -> None:
        argv = [sys.executable, "-m", "tests.backend", "--name", name, *args]
        super().__init__(log_dir, argv)
        try:
            self.port = int(self.wait_for(re.compile(r"listening on (\d+)")).group(1))
        except BaseException:
            self.kill()
            raise
        self.name = name

    def toggle_failing(self, failing: bool) -> None:
        """SIGUSR1, and wait until the app answers as it now should (the signal is handled on
        its event loop's next turn, not at once)."""
        self.proc.send_signal(signal.SIGUSR1)
        want = 503 if failing else 200

        def answers() -> int:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/whoami", timeout=5) as r:
                    return int(r.status)
            except urllib.error.HTTPError as e:
                return e.code

        eventually(lambda: answers() == want, timeout=5, what=f"app answers {want}")

    def hits(self) -> int:
        status, data = http("GET", f"http://127.0.0.1:{self.port}/hits")
        assert status == 200
        count: int = data["hits"]
        return count
