"""Large blocks go back to the system once freed (glibc): a real process's heap, measured."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys
from pathlib import Path
from sidecar import heap

def size() -> int:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            return high - low
    return 0

table = bytearray(4 << 20)  # a large table's text: a mapping of its own
told = heap.tidy_after(len(table)) if sys.argv[1] == "tidied" else False
del table  # freed: glibc, left alone, now serves blocks up to 4 MiB from the heap
before = size()
later = [bytearray(1 << 20) for _ in range(8)]
print(told, size() - before)
"""


def run(how: str) -> tuple[str, int]:
    """Whether ``tidy_after`` acted, and how much the heap grew for 8 blocks of 1 MiB after
    one of 4 MiB was freed."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, how], capture_output=True, text=True, check=True
    )
    told, grew = out.stdout.split()
    return told, int(grew)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_after_a_large_message_large_blocks_stay_out_of_the_heap() -> None:
    _, grew = run("left alone")
    assert grew >= 6 << 20  # what a sidecar did after its first large table
    told, grew = run("tidied")
    assert told == "True"
    assert grew < 1 << 20


def test_a_small_message_changes_nothing_and_imports_nothing() -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from sidecar import heap; "
            "print(heap.tidy_after(heap.MMAP_THRESHOLD - 1), 'ctypes' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.split() == ["False", "False"]
