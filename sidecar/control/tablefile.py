"""Static routing files (``--table``): read, parsed and checked, and what tells a rewrite."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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
    data = _json(text)
    if data is _NOT_JSON:
        data = _yaml(text, path)
    try:
        return parse_table(data if data is not None else {})
    except WireError as e:
        raise TableError(f"{path}: {e}") from None


_NOT_JSON: Any = object()


def _json(text: str) -> Any:
    """A file that is JSON, as YAML would read it, by the JSON parser: a large table's YAML
    parse takes ten times its memory (50 MB for 1,000 services x 10 endpoints). JSON that
    YAML 1.1 reads otherwise (exponents such as 1e3 are strings there, NaN is one) is
    left to YAML."""
    try:
        return json.loads(text, parse_float=_plain_float, parse_constant=_refuse)
    except (ValueError, RecursionError):
        return _NOT_JSON


def _plain_float(text: str) -> float:
    if "e" in text or "E" in text:
        raise ValueError(text)
    return float(text)


def _refuse(text: str) -> Any:
    raise ValueError(text)


def _yaml(text: str, path: str) -> Any:
    import yaml  # (only here: a sidecar on a control plane, or on a JSON file, needs none)

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise TableError(f"{path}: not valid YAML{where}: {getattr(e, 'problem', e)}") from None


def file_signature(path: str) -> tuple[int, int, int] | None:
    """What changes when a file is rewritten (or replaced by rename); None if missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)
