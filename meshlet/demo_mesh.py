"""The demo's processes: a control plane (or, with ``--ha``, three replicas on one Redis), and
sample apps each with its sidecar, all children of the demo on free loopback ports, their logs
in files.

The mesh runs with tokens on, as a user's should: the control plane has an admin token, each
service's sidecars join with a service token minted for it, and every secret is a file of the
demo's (mode 0600), never a command-line argument.

Children run in sessions of their own, so a Ctrl-C in the terminal reaches only the demo, which
then stops them in order (``Mesh.close``: SIGTERM, then SIGKILL after a grace period). On Linux
each child also gets SIGTERM from the kernel should the demo die without cleaning up
(``PR_SET_PDEATHSIG``), so not even a ``kill -9`` of the demo leaves a child behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

LISTENING = re.compile(r"listening on (http://[\d.]+:\d+)")
SIDECAR_LISTENING = re.compile(r"(outbound|inbound|admin|metrics) listening on [\d.]+:(\d+)")
START_TIMEOUT = 30.0
"""seconds a child gets to say it is listening (a loaded 2-core machine starts Python slowly)"""
STOP_GRACE = 5.0
"""seconds children get to exit on SIGTERM before they are killed"""
PR_SET_PDEATHSIG = 1


class StartError(RuntimeError):
    """A child did not start; the message ends with the tail of its log."""


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    assert _LIBC is not None
    _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


REDIS_PASSWORD_ENV = ("MESHLET_REDIS_PASSWORD", "MESHLET_REDIS_PASSWORD_FILE")
"""what replicas on the user's Redis are given of the demo's environment (``--ha --redis``)"""


def _child_env(keep: tuple[str, ...] = ()) -> dict[str, str]:
    """The demo's environment without MESHLET_* settings meant for some other mesh (a
    MESHLET_ADMIN_TOKEN, say, would lock the demo out of its own control plane), but for
    those named in ``keep``."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_") or k in keep}


class Child:
    """One child process whose output goes to ``log_path`` (``Child.start`` starts one)."""

    def __init__(self, label: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.label = label
        self.proc = proc
        self.log_path = log_path

    @classmethod
    async def start(
        cls, label: str, argv: list[str], log_path: Path, keep_env: tuple[str, ...] = ()
    ) -> Child:
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=_child_env(keep_env),
                start_new_session=True,
                preexec_fn=_pdeathsig if _LIBC is not None else None,
            )
        return cls(label, proc, log_path)

    def __repr__(self) -> str:
        state = "running" if self.alive else f"exited {self.proc.returncode}"
        return f"<Child {self.label} [pid {self.pid}, {state}]>"

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_for(self, pattern: re.Pattern[str], count: int = 1) -> list[re.Match[str]]:
        """The first ``count`` matches of ``pattern`` in its log (polled)."""
        try:
            async with asyncio.timeout(START_TIMEOUT):
                while True:
                    found = list(pattern.finditer(self.log()))
                    if len(found) >= count:
                        return found[:count]
                    if not self.alive:
                        raise StartError(
                            f"{self.label} exited {self.proc.returncode}:\n{self._tail()}"
                        )
                    await asyncio.sleep(0.05)
        except TimeoutError:
            raise StartError(
                f"{self.label} did not start within {START_TIMEOUT:.0f} s:\n{self._tail()}"
            ) from None

    def _tail(self, lines: int = 15) -> str:
        return "\n".join("    " + line for line in self.log().splitlines()[-lines:])

    def send(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)

    async def stop(self, sig: int = signal.SIGTERM) -> None:
        """Send ``sig``; SIGKILL if it has not exited within ``STOP_GRACE``."""
        self.send(sig)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(STOP_GRACE):
                await self.proc.wait()
        self.send(signal.SIGKILL)
        await self.proc.wait()


@dataclass
class Instance:
    """A sample app and its sidecar: what the demo calls ``catalog-2``."""

    name: str
    service: str
    app: Child
    sidecar: Child
    app_url: str
    ports: dict[str, int] = field(default_factory=dict)
    """the sidecar's ``outbound``, ``inbound``, ``admin`` and ``metrics`` ports"""

    @property
    def alive(self) -> bool:
        return self.app.alive and self.sidecar.alive

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['metrics']}/metrics"


@dataclass
class Replica:
    """A control-plane process: the only one, or one of the replicas (``replica-2``)."""

    name: str
    child: Child
    url: str

    @property
    def alive(self) -> bool:
        return self.child.alive

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])


class Mesh:
    """Every process of the demo; ``close`` leaves none of them running."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.logs = root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[Child] = []
        self.instances: dict[str, Instance] = {}
        self.replicas: dict[str, Replica] = {}
        """the control plane's processes by name: ``control-plane``, or (``--ha``)
        ``replica-1`` to ``replica-3``"""
        self.store = ""
        """the replicas' ``--store`` (``--ha``)"""
        self.lease_ttl = 0.0
        self.secrets = root / "secrets"
        self.secrets.mkdir(mode=0o700, exist_ok=True)
        self.admin_token = secrets.token_urlsafe(32)
        self.admin_token_file = self._secret("admin", self.admin_token)

    def _secret(self, name: str, value: str) -> Path:
        path = self.secrets / f"{name}.token"
        path.touch(mode=0o600)
        path.write_text(value + "\n")
        return path

    @property
    def ha(self) -> bool:
        """Replicas on Redis rather than one control plane on SQLite."""
        return bool(self.store)

    @property
    def control_plane(self) -> Child | None:
        """The first control-plane process that is running (the first there was, when none
        is)."""
        replica = self._live_replica()
        return replica.child if replica else None

    @property
    def url(self) -> str:
        """A control plane's REST API: the first replica that is running (any replica
        serves all of it)."""
        replica = self._live_replica()
        return replica.url if replica else ""

    @property
    def urls(self) -> list[str]:
        """What sidecars are given as ``--control-plane``: every replica."""
        return [r.url for r in self.replicas.values()]

    def _live_replica(self) -> Replica | None:
        replicas = list(self.replicas.values())
        return next((r for r in replicas if r.alive), replicas[0] if replicas else None)

    @property
    def auth(self) -> dict[str, str]:
        """Headers for the control plane's REST API (the admin token)."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def __repr__(self) -> str:
        alive = sum(c.alive for c in self.children)
        return f"<Mesh [{alive} of {len(self.children)} processes running, {self.url}]>"

    async def _spawn(
        self, label: str, module: str, *args: str, keep_env: tuple[str, ...] = ()
    ) -> Child:
        """Start ``python -m module args``; its output goes to ``LABEL.log`` (``LABEL.2.log``
        when it is started the second time)."""
        runs = sum(c.label == label for c in self.children)
        log = self.logs / (label.replace(" ", "-") + (f".{runs + 1}" if runs else "") + ".log")
        child = await Child.start(label, [sys.executable, "-m", module, *args], log, keep_env)
        self.children.append(child)
        return child

    async def start_control_plane(self, port: int) -> str:
        """One control plane on SQLite in the demo's directory."""
        await self._start_replica("control-plane", port, f"sqlite:///{self.root / 'meshlet.db'}")
        return self.url

    async def start_replicas(self, port: int, store: str, lease_ttl: float, count: int) -> str:
        """``count`` control-plane replicas on the Redis ``store`` (the first on ``port``),
        each telling the others its changes through Redis; one of them reaps."""
        self.store, self.lease_ttl = store, lease_ttl
        first = await self._start_replica("replica-1", port, store)
        async with asyncio.TaskGroup() as tasks:
            for k in range(2, count + 1):
                tasks.create_task(self._start_replica(f"replica-{k}", 0, store))
        self.replicas = dict(sorted(self.replicas.items()))
        return first.url

    async def _start_replica(
        self, name: str, port: int, store: str, spawned: Callable[[int], None] | None = None
    ) -> Replica:
        """``spawned``: told the pid as soon as the process exists (the demo may end before
        the replica listens; every process it started has been named)."""
        extra = ("--lease-ttl", f"{self.lease_ttl:g}") if self.ha else ()
        child = await self._spawn(
            name,
            "control_plane",
            "--listen", f"127.0.0.1:{port}",
            "--store", store,
            "--admin-token-file", str(self.admin_token_file),
            *extra,
            keep_env=REDIS_PASSWORD_ENV if self.ha else (),
        )  # fmt: skip
        if spawned is not None:
            spawned(child.pid)
        (found,) = await child.wait_for(LISTENING)
        replica = Replica(name, child, found.group(1))
        self.replicas[name] = replica
        return replica

    async def kill_replica(self, name: str) -> int:
        """``kill -9`` a control-plane replica; its pid."""
        child = self.replicas[name].child
        child.send(signal.SIGKILL)
        await child.proc.wait()
        return child.pid

    async def restart_replica(self, name: str, spawned: Callable[[int], None]) -> Replica:
        """Start a replica that was killed again, on its old port."""
        return await self._start_replica(name, self.replicas[name].port, self.store, spawned)

    async def mint_token(self, http: aiohttp.ClientSession, service: str) -> None:
        """A service token for ``service``'s sidecars (``secrets/SERVICE.token``)."""
        body = {"service": service, "description": "meshlet demo"}
        async with http.post(f"{self.url}/v1/tokens", json=body, headers=self.auth) as r:
            if r.status != 201:
                raise StartError(f"no token for {service}: {r.status} {await r.text()}")
            self._secret(service, (await r.json())["secret"])

    async def start_instance(self, service: str, name: str, *, inbound: int = 0) -> Instance:
        """``service``'s sample app and its sidecar. A frontend app calls catalog through its
        sidecar, so that sidecar starts first (its app on a port picked for it); a catalog
        app starts first, so that its sidecar's first health check finds it up."""
        if service == "frontend":
            app_url = f"http://127.0.0.1:{free_port()}"
            sidecar = await self._sidecar(service, name, app_url, inbound)
            ports = await _sidecar_ports(sidecar)
            app = await self._app(
                service, name, app_url, "--outbound", f"127.0.0.1:{ports['outbound']}"
            )
            await app.wait_for(LISTENING)
        else:
            app = await self._app(service, name, "http://127.0.0.1:0")
            (found,) = await app.wait_for(LISTENING)
            app_url = found.group(1)
            sidecar = await self._sidecar(service, name, app_url, inbound)
            ports = await _sidecar_ports(sidecar)
        instance = Instance(name, service, app, sidecar, app_url, ports)
        self.instances[name] = instance
        return instance

    async def _app(self, service: str, name: str, url: str, *args: str) -> Child:
        port = url.rsplit(":", 1)[1]
        return await self._spawn(
            f"{name} app", "meshlet.samples", service, "--name", name, "--port", port, *args
        )

    async def _sidecar(self, service: str, name: str, app_url: str, inbound: int) -> Child:
        return await self._spawn(
            f"{name} sidecar",
            "sidecar",
            "--service", service,
            "--control-plane", ",".join(self.urls),
            "--app", app_url,
            "--advertise", "127.0.0.1",
            "--outbound", "127.0.0.1:0",
            "--inbound", f"127.0.0.1:{inbound}",
            "--admin", "127.0.0.1:0",
            "--metrics-listen", "127.0.0.1:0",
            "--token-file", str(self.secrets / f"{service}.token"),
            "--state-dir", str(self.root / "state" / name),
            "--app-health-interval", "1",
            "--deregister-delay", "0.2",
            "--drain-timeout", "2",
        )  # fmt: skip

    async def kill(self, name: str, *, app_only: bool = False) -> list[int]:
        """``kill -9`` an instance's app and sidecar at once, as when its pod or VM dies (or
        only its app, as when the app crashes); the pids killed."""
        instance = self.instances[name]
        victims = [instance.app] if app_only else [instance.app, instance.sidecar]
        for child in victims:
            child.send(signal.SIGKILL)
        for child in victims:
            await child.proc.wait()
        return [c.pid for c in victims]

    async def restart(self, name: str) -> Instance:
        """Start what was killed of an instance again, on the same ports: a sidecar on the
        same inbound port comes back as the same instance (the control plane's id is address
        and port); an app on its old port is where its sidecar looks for it."""
        old = self.instances[name]
        if old.sidecar.alive:
            old.app = await self._app(old.service, name, old.app_url)
            await old.app.wait_for(LISTENING)
            return old
        return await self.start_instance(old.service, name, inbound=old.ports["inbound"])

    async def close(self) -> None:
        """Stop every child still running: SIGTERM to the apps and sidecars (the sidecars
        deregister), then to the control plane (its replicas); whatever has not exited within
        ``STOP_GRACE`` of its SIGTERM gets SIGKILL."""
        control = {r.child for r in self.replicas.values()}
        async with asyncio.TaskGroup() as tasks:
            for child in self.children:
                if child not in control:
                    tasks.create_task(child.stop())
        async with asyncio.TaskGroup() as tasks:
            for child in control:
                tasks.create_task(child.stop())


async def _sidecar_ports(sidecar: Child) -> dict[str, int]:
    found = await sidecar.wait_for(SIDECAR_LISTENING, 4)
    return {m.group(1): int(m.group(2)) for m in found}
