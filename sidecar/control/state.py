"""The last good routing table on disk, so a sidecar can start while the control plane is down.

The file is written atomically (temp file, fsync, rename, fsync of the directory) and carries a
SHA-256 of its table: a torn or edited file is refused with a warning, never half-used. The
table is kept as the message that brought it, byte for byte (re-encoding a large table would
cost as much memory again as parsing it did).

    meshlet-table 1 sha256=<hex>\\n
    <the table message, as pushed>
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from control_plane.wire import Table, WireError, decode
from sidecar.errors import SidecarError

MAGIC = "meshlet-table 1 sha256="
_CHUNK = 64 * 1024
"""characters encoded at a time"""


class StateError(SidecarError):
    """The saved table cannot be used; the message says why."""


def save(path: Path, message: str) -> None:
    """Keep ``message`` (a table message, as received) as the last good table."""
    digest = hashlib.sha256()
    for chunk in _utf8(message):
        digest.update(chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            f.write(f"{MAGIC}{digest.hexdigest()}\n".encode())
            f.writelines(_utf8(message))
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:  # a full disk, say: the old table stays, and no half-written copy
        tmp.unlink(missing_ok=True)
        raise
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _utf8(message: str) -> Iterator[bytes]:
    """``message`` encoded a piece at a time: a table is megabytes, and its whole encoding
    made at once (in the thread that saves) stayed in that thread's heap."""
    for start in range(0, len(message), _CHUNK):
        yield message[start : start + _CHUNK].encode()


def load(path: Path) -> Table:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise StateError(f"{path}: {e.strerror or e}") from None
    header, newline, body = raw.partition(b"\n")
    del raw  # (a copy of the table less)
    text = header.decode("ascii", "replace")
    if not newline or not text.startswith(MAGIC):
        raise StateError(f"{path}: not a meshlet table file")
    if hashlib.sha256(body).hexdigest() != text.removeprefix(MAGIC):
        raise StateError(f"{path}: checksum mismatch (torn or edited)")
    try:
        table = decode(body)
    except WireError as e:
        raise StateError(f"{path}: {e}") from None
    if not isinstance(table, Table):
        raise StateError(f"{path}: holds a {type(table).__name__}, not a table")
    return table
