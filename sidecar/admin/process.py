"""The process's own metrics, read from ``/proc/self`` at scrape time: the ``process_*``
families every Prometheus client library exports (the same names, help and values as
prometheus-client's ``ProcessCollector``). Where there is no ``/proc`` there are none."""

from __future__ import annotations

import os
import resource
from pathlib import Path

from sidecar.admin.exposition import Family, counter, gauge


class ProcessMetrics:
    """CPU time, memory, start time and file descriptors of this process."""

    def __init__(self, proc: str = "/proc") -> None:
        self.proc = Path(proc)
        self.ticks = float(os.sysconf("SC_CLK_TCK"))
        """clock ticks per second (``/proc/self/stat`` counts CPU time and start in them)"""
        self.page_size = resource.getpagesize()
        """bytes (``/proc/self/stat`` counts resident memory in pages)"""
        self.boot_time = _boot_time(self.proc / "stat")
        """seconds since the epoch (0: unknown, and then nothing is reported)"""

    def __repr__(self) -> str:
        return f"<ProcessMetrics {self.proc}/self>"

    def families(self) -> list[Family]:
        if not self.boot_time:
            return []
        found: list[Family] = []
        me = self.proc / "self"
        try:
            # the fields after the command, which is in parentheses and may hold spaces
            fields = (me / "stat").read_bytes().rpartition(b")")[2].split()
        except OSError:
            pass
        else:
            cpu = (float(fields[11]) + float(fields[12])) / self.ticks  # utime + stime
            found += [
                gauge(
                    "process_virtual_memory_bytes",
                    "Virtual memory size in bytes.",
                    value=float(fields[20]),
                ),
                gauge(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    value=float(fields[21]) * self.page_size,
                ),
                gauge(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    value=float(fields[19]) / self.ticks + self.boot_time,
                ),
                counter(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds.",
                    value=cpu,
                ),
            ]
        try:
            most = _max_open_files(me / "limits")
            open_fds = len(os.listdir(me / "fd"))
        except OSError:
            return found
        found.append(gauge("process_open_fds", "Number of open file descriptors.", value=open_fds))
        if most is not None:
            found.append(
                gauge("process_max_fds", "Maximum number of open file descriptors.", value=most)
            )
        return found


def _boot_time(stat: Path) -> float:
    """The ``btime`` line of ``/proc/stat``: when the host booted (0: unknown)."""
    try:
        with stat.open("rb") as lines:
            for line in lines:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def _max_open_files(limits: Path) -> float | None:
    """The soft limit on open files from ``/proc/self/limits`` (``unlimited``: +Inf)."""
    for line in limits.read_bytes().splitlines():
        if line.startswith(b"Max open files"):
            soft = line.split()[3]
            return float("inf") if soft == b"unlimited" else float(soft)
    return None
