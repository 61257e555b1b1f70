"""``meshlet demo`` end to end: a real mesh of nine processes under traffic loses an instance
and gets it back with no client error, says so in its summary, and leaves no process behind
however it ends; ``demo --ha`` does it on three control-plane replicas and a real Redis, and
loses the replica that reaps as well."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.processes import free_port
from tests.redis_server import RedisServer

pytestmark = pytest.mark.slow

MESHLET = str(Path(sys.executable).with_name("meshlet"))
PROCESSES = 9
"""control plane, and an app and a sidecar for each of catalog-1..3 and frontend-1"""
LEASE_TTL = 3.0
"""seconds: the reaper's lease in ``demo --ha`` (``meshlet.demo_ha.LEASE_TTL``)"""


class Demo:
    """``meshlet demo`` with its output collected, and every child it ever had (sampled from
    /proc while it runs, since the demo restarts some)."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [MESHLET, "demo", "--no-tty", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.children: set[int] = set()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def _sample(self) -> None:
        while self.proc.poll() is None:
            self.children |= children_of(self.proc.pid)
            time.sleep(0.1)

    @property
    def out(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.out:
            assert self.proc.poll() is None, f"demo exited before {text!r}:\n{self.out}"
            assert time.monotonic() < deadline, f"no {text!r} within {timeout} s:\n{self.out}"
            time.sleep(0.05)

    def wait_for_line(self, pattern: re.Pattern[str], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while pattern.search(self.out) is None:
            assert self.proc.poll() is None, f"demo exited before {pattern}:\n{self.out}"
            assert time.monotonic() < deadline, f"no {pattern} within {timeout} s:\n{self.out}"
            time.sleep(0.05)

    def wait(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def close(self) -> None:
        """Whatever state it is in: gone, its pipe closed (for teardown)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(15)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


@pytest.fixture
def demos() -> Iterator[list[Demo]]:
    started: list[Demo] = []
    yield started
    for demo in started:
        demo.close()


def children_of(pid: int) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def running(pids: set[int]) -> list[str]:
    """Those of ``pids`` that are still meshlet processes, with their command lines."""
    alive = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and re.search(r"meshlet\.samples|-m sidecar|-m control_plane", cmdline):
            alive.append(f"{pid}: {cmdline}")
    return alive


def printed_pids(out: str) -> set[int]:
    """``pid 12``, ``pids 12 and 13``: what the demo says it started."""
    found = set()
    for one, other in re.findall(r"\bpids? (\d+)(?: and (\d+))?", out):
        found |= {int(one), *([int(other)] if other else [])}
    return found


def assert_all_gone(demo: Demo) -> None:
    left = running(demo.children | printed_pids(demo.out))
    if left:
        for pid in demo.children:  # clean up for the next test, then fail
            os.kill(pid, signal.SIGKILL)
    assert left == [], demo.out


def summary_number(out: str, pattern: str) -> int:
    found = re.search(pattern, out)
    assert found, f"no {pattern!r} in:\n{out}"
    return int(found.group(1))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_demo_fails_over_with_no_client_error_and_reports_it(demos: list[Demo]) -> None:
    """The issue's ``meshlet demo --duration 30 --no-tty``: an instance is killed 7.5 s in and
    restarted 9 s later; the summary counts the requests, no client errors, a fail-over
    well under a second, and traffic to the restarted instance."""
    demo = Demo("--duration", "30")
    demos.append(demo)
    assert demo.wait(90) == 0, demo.out
    out = demo.out
    assert "Traceback" not in out
    assert out.rstrip().endswith("meshlet demo: stopped")
    assert len(demo.children) >= PROCESSES + 2, demo.children  # two of them restarted
    assert demo.children <= printed_pids(out)

    requests = summary_number(out, r"requests +(\d+) sent at 50/s")
    assert 1200 <= requests <= 1800  # a Poisson process at 50/s for 30 s
    assert summary_number(out, r"(\d+) answered, client errors") == requests
    assert summary_number(out, r"client errors (\d+)") == 0
    assert re.search(r"kill -9 +catalog-2, app and sidecar, at 7\.\d s", out), out
    fail_over = summary_number(out, r"fail-over +(\d+) ms")
    assert 0 < fail_over < 3000, out  # the stream closes at once; pushes are debounced 100 ms
    assert summary_number(out, r"answered (\d+) requests since") > 20
    ramp = re.search(r"catalog-2's share per 2 s from its return: (.*) \(even: 33%\)", out)
    assert ramp, out
    shares = [int(s.rstrip("%")) for s in ramp.group(1).split() if s != "-"]
    assert shares[0] < 25, "slow start begins at a small share"
    assert max(shares[2:]) > shares[0], "and grows"
    # the per-second lines show the killed instance with no traffic, out of the table
    assert re.search(r"catalog-2 +0/s \(killed, unhealthy, out of table\)", out), out
    assert "slow start" in out
    tls = re.search(r"mutual TLS +(\d+) sidecars hold a certificate; (\d+) sessions", out)
    assert tls, out
    assert int(tls.group(1)) >= 4  # (frontend, the catalogs alive at the end)
    assert int(tls.group(2)) >= 2  # frontend to each catalog, and again after a restart
    assert_all_gone(demo)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_mid_run_ends_the_demo_with_a_summary_and_no_child_left(
    demos: list[Demo],
) -> None:
    demo = Demo("--duration", "60")
    demos.append(demo)
    demo.wait_for("Ctrl-C stops the demo")
    # traffic is flowing: a second progress line (at 2.0 s, or later on a loaded machine)
    demo.wait_for_line(re.compile(r"^ +[2-9]\.\d s  requests", re.M))
    assert len(children_of(demo.proc.pid)) == PROCESSES
    demo.proc.send_signal(signal.SIGINT)
    assert demo.wait(20) == 0, demo.out
    out = demo.out
    assert "meshlet demo: summary" in out
    assert summary_number(out, r"client errors (\d+)") == 0
    assert out.rstrip().endswith("meshlet demo: stopped")
    assert_all_gone(demo)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigterm_while_starting_leaves_no_child(demos: list[Demo]) -> None:
    demo = Demo("--duration", "60")
    demos.append(demo)
    deadline = time.monotonic() + 30
    while len(demo.children) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    demo.proc.send_signal(signal.SIGTERM)
    assert demo.wait(20) == 0, demo.out
    assert "stopped before it had started" in demo.out
    assert_all_gone(demo)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_kill_9_of_the_demo_takes_its_children_with_it(demos: list[Demo]) -> None:
    """Nothing can clean up after SIGKILL; the kernel sends each child SIGTERM instead."""
    demo = Demo("--duration", "60")
    demos.append(demo)
    demo.wait_for("Ctrl-C stops the demo")
    children = children_of(demo.proc.pid)
    assert len(children) == PROCESSES
    demo.proc.kill()
    demo.wait(10)
    deadline = time.monotonic() + 15
    while running(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert running(children) == []
    found = re.search(r"sidecars in (/\S+)", demo.out)  # its temp dir outlives it
    assert found, demo.out
    shutil.rmtree(found.group(1), ignore_errors=True)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_ha_demo_kills_the_reaping_replica_and_no_request_fails(
    demos: list[Demo], tmp_path: Path
) -> None:
    """``meshlet demo --ha`` on a Redis of the test's: three replicas; three quarters into
    the cycle the one that reaps is killed, another takes the lease within its TTL, the
    sidecars on it move, no request fails, and the demo leaves nothing in Redis."""
    server = RedisServer(tmp_path / "redis")
    try:
        demo = Demo("--ha", "--redis", server.url, "--duration", "30")
        demos.append(demo)
        assert demo.wait(120) == 0, demo.out
        out = demo.out
        assert "Traceback" not in out
        assert out.rstrip().endswith("meshlet demo: stopped")
        assert demo.children <= printed_pids(out)
        assert len(re.findall(r"replica-\d +http://127\.0\.0\.1:\d+ +\(pid \d+\)", out)) == 3

        requests = summary_number(out, r"requests +(\d+) sent at 50/s")
        assert 1200 <= requests <= 1800
        assert summary_number(out, r"(\d+) answered, client errors") == requests
        assert summary_number(out, r"client errors (\d+)") == 0
        killed = re.search(r"kill -9 +(replica-\d), the replica that reaps, at 2[23]\.\d s", out)
        assert killed, out
        new = re.search(
            r"new reaper +(replica-\d) after (\d+) ms|new reaper +(replica-\d) after "
            r"([\d.]+) s",
            out,
        )
        assert new, out
        successor = new.group(1) or new.group(3)
        took = int(new.group(2)) / 1000 if new.group(2) else float(new.group(4))
        assert successor != killed.group(1)
        assert took <= LEASE_TTL + 2, out  # the lease lapses, the next tick takes it
        assert summary_number(out, r"meanwhile +client errors (\d+) until its restart") == 0
        # the per-second lines show the killed replica, then the new reaper and the restart
        assert re.search(rf"\| {killed.group(1)} killed", out), out
        assert re.search(rf"\| {successor} reaper", out), out
        assert re.search(rf"restart {killed.group(1)} \(on its old port; pid \d+\)", out), out
        assert "meshlet demo: removed its" in out
        with redis.Redis.from_url(server.url) as client:
            assert client.dbsize() == 0  # its own prefix, and nothing of it left
        assert_all_gone(demo)
    finally:
        server.stop()


def test_the_ha_demo_with_no_redis_says_so_in_one_line_and_exits_2() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    done = subprocess.run(
        [MESHLET, "demo", "--ha", "--no-tty", "--redis", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"meshlet demo: --ha needs a Redis server and {url} does not answer")
    assert "apt-get install redis-server" in line
    assert "--redis redis://HOST:PORT/DB" in line
