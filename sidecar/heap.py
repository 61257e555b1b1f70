"""The C heap of a long-running process that now and then takes a large message.

glibc's ``malloc`` gives a block of 128 KiB or more a mapping of its own, unmapped when the
block is freed, until the first such block is freed: then it raises that threshold to the
block's size (up to 32 MiB) and the heap's trim threshold to twice it, so that blocks of that
size come from the heap, whose freed space it keeps. A sidecar's large blocks are its pushed
tables, now and then: the frames of a 1,000 services x 10 endpoints table, and its 1.7 MB of
text, came from the heap from the second table on, and left 4-7 MB there, free but resident.
So after a large message the threshold is set back (setting it, as ``MALLOC_MMAP_THRESHOLD_``
does, turns the raising off: large blocks stay mapped and go back to the system when freed)
and the heap's free pages are given back (``malloc_trim``). Allocations of the request path
are far below the threshold.
"""

from __future__ import annotations

M_MMAP_THRESHOLD = -3
"""``mallopt``'s parameter (glibc ``malloc.h``)"""
MMAP_THRESHOLD = 128 * 1024
"""bytes: glibc's own starting value, kept"""


def tidy_after(size: int) -> bool:
    """After a message of ``size`` characters (as many bytes or more) was taken in and put
    to use: if it was large, large blocks are mapped of their own from now on, and the heap's
    free pages go back to the system. False where nothing was done: a small message
    (``ctypes`` is not even imported, 0.3 MB an idle sidecar does without), or a C library
    that is not glibc (musl maps large blocks always)."""
    if size < MMAP_THRESHOLD:
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None)  # (the C library the interpreter runs on)
        mallopt, malloc_trim = libc.mallopt, libc.malloc_trim
    except (OSError, AttributeError):
        return False
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    malloc_trim(0)
    return True
