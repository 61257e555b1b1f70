"""Static routing files (``--table``): read, parsed and checked, and what tells a rewrite."""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from control_plane.wire import Table, WireError, parse_table
from sidecar.errors import TableError


def load_table_file(path: str) -> Table:
    """A static routing file (YAML or JSON); TableError names what is wrong."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TableError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError:
        raise TableError(f"{path}: not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TableError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None
    try:
        return parse_table(data if data is not None else {})
    except WireError as e:
        raise TableError(f"{path}: {e}") from None


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (or replaced by rename); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
