"""Large blocks go back to the system when freed (glibc): a real process's heap, measured."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

PROBE = """
import sys
from pathlib import Path
from sidecar.heap import keep_large_blocks_mapped

def heap() -> int:
    for line in Path("/proc/self/maps").read_text().splitlines():
        if line.endswith("[heap]"):
            low, high = (int(x, 16) for x in line.split()[0].split("-"))
            return high - low
    return 0

if sys.argv[1] == "kept mapped":
    assert keep_large_blocks_mapped()
first = bytearray(4 << 20)  # a table's text, say: a mapping of its own
del first  # freed: glibc would now serve blocks up to 4 MiB from the heap
before = heap()
later = [bytearray(1 << 20) for _ in range(8)]
print(heap() - before)
"""


def heap_growth(how: str) -> int:
    """Bytes the heap grew by for 8 blocks of 1 MiB, after one of 4 MiB was freed."""
    out = subprocess.run(
        [sys.executable, "-c", PROBE, how], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc")
def test_large_blocks_stay_out_of_the_heap_after_a_large_one_was_freed() -> None:
    assert heap_growth("as glibc starts") >= 8 << 20  # what a sidecar would do without it
    assert heap_growth("kept mapped") < 1 << 20
