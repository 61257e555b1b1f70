"""A real sidecar process: 1 GiB both ways in bounded memory, drain, reload, start-up errors."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from tests.processes import Sidecar

pytestmark = pytest.mark.slow

GiB = 1024**3
RSS_LIMIT = 100 * 1024**2
BLOCK = memoryview(b"m" * (1024 * 1024))
Start = Callable[..., Sidecar]


def table(path: Path, port: int, name: str = "svc") -> Path:
    path.write_text(
        f"services:\n  {name}:\n    policy: {{lb: round_robin, timeout_ms: 60000}}\n"
        f"    endpoints: [{{address: 127.0.0.1, port: {port}}}]\n"
    )
    return path


class BigUpstream:
    """Answers GET /download?size=N with N bytes, and POST /upload by counting the body."""

    def __init__(self) -> None:
        self.uploaded = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode()
                line = head.split("\r\n")[0]
                if line.startswith("GET /download"):
                    size = int(line.split("size=")[1].split()[0])
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
                    sent = 0
                    while sent < size:
                        n = min(len(BLOCK), size - sent)
                        writer.write(BLOCK[:n])
                        sent += n
                        await writer.drain()
                elif line.startswith("POST /upload"):
                    length = int(re.search(r"(?i)content-length: (\d+)", head).group(1))  # type: ignore[union-attr]
                    left = length
                    while left:
                        chunk = await reader.read(min(left, 1 << 20))
                        if not chunk:
                            return
                        left -= len(chunk)
                    self.uploaded = length
                    body = str(length).encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
                    )
                    await writer.drain()
                else:
                    writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def big_upstream() -> AsyncIterator[tuple[BigUpstream, int]]:
    up = BigUpstream()
    server = await asyncio.start_server(up.handle, "127.0.0.1", 0)
    yield up, server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


class RssWatch:
    """The sidecar's largest RSS while the block runs."""

    def __init__(self, sidecar: Sidecar) -> None:
        self.sidecar = sidecar
        self.peak = 0

    async def __aenter__(self) -> RssWatch:
        self._task = asyncio.create_task(self._sample())
        return self

    async def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, self.sidecar.rss_bytes())
            await asyncio.sleep(0.05)

    async def __aexit__(self, *exc: object) -> None:
        self._task.cancel()
        self.peak = max(self.peak, self.sidecar.rss_bytes())


async def download(port: int, size: int, *, pause_after: int = 0, pause: float = 0.0) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(b"GET /download?size=%d HTTP/1.1\r\nHost: svc\r\n\r\n" % size)
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    got = 0
    paused = False
    while got < size:
        chunk = await reader.read(1 << 20)
        if not chunk:
            break
        got += len(chunk)
        if pause and not paused and got >= pause_after:
            paused = True
            await asyncio.sleep(pause)  # a slow reader: the proxy must stop reading upstream
    writer.close()
    return got


async def test_one_gib_download_and_upload_in_bounded_memory(
    sidecar_process: Start, big_upstream: tuple[BigUpstream, int], tmp_path: Path
) -> None:
    up, port = big_upstream
    sidecar = sidecar_process("--service", "t", "--table", str(table(tmp_path / "t.yaml", port)))
    out = sidecar.ports["outbound"]
    async with RssWatch(sidecar) as rss:
        assert await download(out, GiB) == GiB
    assert rss.peak < RSS_LIMIT, f"RSS {rss.peak / 2**20:.0f} MB during a 1 GiB download"

    async with RssWatch(sidecar) as rss:
        reader, writer = await asyncio.open_connection("127.0.0.1", out)
        writer.write(b"POST /upload HTTP/1.1\r\nHost: svc\r\nContent-Length: %d\r\n\r\n" % GiB)
        for _ in range(GiB // len(BLOCK)):
            writer.write(BLOCK)
            await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        body = await reader.read(64)
        writer.close()
    assert head.startswith(b"HTTP/1.1 200")
    assert body == str(GiB).encode()
    assert up.uploaded == GiB
    assert rss.peak < RSS_LIMIT, f"RSS {rss.peak / 2**20:.0f} MB during a 1 GiB upload"


async def test_a_slow_reader_applies_back_pressure(
    sidecar_process: Start, big_upstream: tuple[BigUpstream, int], tmp_path: Path
) -> None:
    _, port = big_upstream
    sidecar = sidecar_process("--service", "t", "--table", str(table(tmp_path / "t.yaml", port)))
    size = 400 * 1024**2
    async with RssWatch(sidecar) as rss:
        got = await download(sidecar.ports["outbound"], size, pause_after=1 << 20, pause=2.0)
    assert got == size
    # had the proxy kept reading while the client did not, it would hold ~400 MB
    assert rss.peak < RSS_LIMIT, f"RSS {rss.peak / 2**20:.0f} MB with a paused reader"


async def test_sigterm_finishes_in_flight_requests_then_exits_0(
    sidecar_process: Start, tmp_path: Path
) -> None:
    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.sleep(1.0)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(slow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sidecar = sidecar_process(
        "--service", "t", "--table", str(table(tmp_path / "t.yaml", port)), "--drain-timeout", "5"
    )
    out = sidecar.ports["outbound"]
    reader, writer = await asyncio.open_connection("127.0.0.1", out)
    writer.write(b"GET / HTTP/1.1\r\nHost: svc\r\n\r\n")
    await writer.drain()
    await asyncio.sleep(0.3)
    started = time.monotonic()
    sidecar.proc.send_signal(signal.SIGTERM)
    response = await asyncio.wait_for(reader.read(), 5)
    assert response.startswith(b"HTTP/1.1 200 OK")
    assert b"connection: close" in response.lower()
    assert response.endswith(b"slow")
    await asyncio.sleep(0.2)
    with pytest.raises(ConnectionRefusedError):  # no longer accepting
        await asyncio.open_connection("127.0.0.1", out)
    code = await asyncio.to_thread(sidecar.proc.wait, 10)
    assert code == 0
    assert time.monotonic() - started < 5
    assert "stopped" in sidecar.log()
    assert "Traceback" not in sidecar.log()
    writer.close()
    server.close()


def test_sighup_reloads_the_table(sidecar_process: Start, tmp_path: Path) -> None:
    path = table(tmp_path / "t.yaml", 1111, name="aaa")
    sidecar = sidecar_process("--service", "t", "--table", str(path))
    stat = path.stat()
    # same size, same inode, same mtime: only SIGHUP can tell the watcher something changed
    with path.open("r+") as f:
        f.write(path.read_text().replace("aaa", "bbb"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    time.sleep(1.5)
    assert "bbb" not in str(sidecar.admin("/config_dump")[1]["table"]["services"])
    sidecar.proc.send_signal(signal.SIGHUP)
    sidecar.wait_for(re.compile("routing table reloaded"))
    assert list(sidecar.admin("/config_dump")[1]["table"]["services"]) == ["bbb"]
    # a bad file on SIGHUP: one log line, the old table stays
    path.write_text("services: {BAD: {}}")
    sidecar.proc.send_signal(signal.SIGHUP)
    line = sidecar.wait_for(re.compile(r"routing table rejected.*"))
    assert "services.BAD: must be a DNS label" in line.group(0)
    assert list(sidecar.admin("/config_dump")[1]["table"]["services"]) == ["bbb"]
    assert sidecar.stop() == 0


@pytest.mark.parametrize(
    ("args", "says"),
    [
        ([], "--service: required"),
        (["--service", "Bad_Name"], "--service: must be a DNS label"),
        (
            ["--service", "a", "--app", "ftp://x:1"],
            "argument --app: 'ftp://x:1' is not http://HOST:PORT",
        ),
        (["--service", "a", "--outbound", "nope"], "argument --outbound: 'nope' is not HOST:PORT"),
        (["--service", "a", "--drain-timeout", "-1"], "--drain-timeout: must not be negative"),
        (
            ["--service", "a", "--control-plane", "https://cp:7070", "--ca-file", "/nonexistent"],
            "--ca-file: /nonexistent: No such file or directory",
        ),
        (
            ["--service", "a", "--control-plane", "https://cp:7070", "--ca-file", "/etc/hostname"],
            "--ca-file: /etc/hostname: no PEM certificate could be loaded",
        ),
        (["--service", "a", "--token-file", "/nonexistent"], "--token-file /nonexistent: No such"),
        (["--service", "a", "--metrics-listen", "x"], "argument --metrics-listen: 'x' is not"),
    ],
)
def test_bad_flags_exit_2_with_one_line(args: list[str], says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")}
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert says in done.stderr


def test_token_and_its_old_name_together_exit_2_with_one_line() -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MESHLET_")},
        "MESHLET_TOKEN": "svc-token",
        "MESHLET_JOIN_TOKEN": "join-token",
    }
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "--service", "a"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    assert done.returncode == 2
    assert done.stderr == (
        "python -m sidecar: error: --token and --join-token: give one (--join-token is the old "
        "name)\n"
    )


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "No such file or directory"),
        ("services: [", "not valid YAML at line"),
        (
            "services: {a: {endpoints: [{address: 127.0.0.1}]}}",
            "services.a.endpoints[0].port: is required",
        ),
    ],
)
def test_an_unusable_table_stops_the_start_with_exit_2(
    tmp_path: Path, content: str | None, says: str
) -> None:
    path = tmp_path / "t.yaml"
    if content is not None:
        path.write_text(content)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "sidecar",
            "--service",
            "a",
            "--table",
            str(path),
            "--outbound",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "cannot start" in done.stderr
    assert says in done.stderr
    assert "Traceback" not in done.stderr
