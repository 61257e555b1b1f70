"""The C heap of a long-running process that now and then takes a large message.

glibc's ``malloc`` gives a block of 128 KiB or more a mapping of its own, unmapped when the
block is freed, until the first such block is freed: then it raises that threshold to the
block's size (up to 32 MiB) and the heap's trim threshold to twice it, so that blocks of that
size come from the heap, whose freed space it keeps. A sidecar's large blocks are its pushed
tables, now and then: the frames of a 1,000 services x 10 endpoints table, and its 1.7 MB of
text, came from the heap from the second table on and left 5-7 MB there, free but resident.
Setting the threshold (as ``MALLOC_MMAP_THRESHOLD_`` does) turns the raise off: large blocks
stay mapped, and go back to the system when freed. Allocations of the request path are far
below it.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3
"""``mallopt``'s parameter (glibc ``malloc.h``)"""
MMAP_THRESHOLD = 128 * 1024
"""bytes: glibc's own starting value, kept"""


def keep_large_blocks_mapped() -> bool:
    """Fix glibc's mmap threshold at its default; False where ``malloc`` is not glibc's
    (musl maps large blocks always and ignores ``mallopt``)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # (the C library the interpreter runs on)
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD))
