"""A real redis-server for tests, on a free loopback port, with nothing saved to disk."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from tests.processes import free_port


class RedisServer:
    """``redis-server`` on 127.0.0.1; ``restart`` brings it back on the same port (empty
    unless ``persist``: then an append-only file keeps what it had, as a production Redis
    would). ``extra`` goes to the command line (a password, say). With ``tls`` (a directory
    holding cert.pem, key.pem and ca.pem) it speaks only TLS."""

    def __init__(
        self, workdir: Path, *extra: str, persist: bool = False, tls: Path | None = None
    ) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls is not None
        ports = ["--port", str(self.port)]
        if tls is not None:
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-auth-clients", "no"]
            for option, name in (("cert", "cert"), ("key", "key"), ("ca-cert", "ca")):
                ports += [f"--tls-{option}-file", str(tls / f"{name}.pem")]
        self.argv = [
            binary,
            "--bind",
            "127.0.0.1",
            *ports,
            "--dir",
            str(workdir),
            "--save",
            "",
            "--appendonly",
            "yes" if persist else "no",
            "--appendfsync",
            "always",
            *extra,
        ]
        self.log_path = workdir / f"redis-{self.port}.log"
        self.url = f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited:\n{self.log_path.read_text()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                    if self.tls:
                        return  # listening is enough: its clients check the rest
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith((b"+PONG", b"-NOAUTH")):
                        return
            except OSError:
                pass
            time.sleep(0.02)
        raise RuntimeError(f"redis-server not up within 10s:\n{self.log_path.read_text()}")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(15)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def pause(self) -> None:
        """SIGSTOP: connections stay open and nothing answers (a hung server)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
