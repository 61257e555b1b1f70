"""Static routing files: JSON read by the JSON parser, as YAML would read it; YAML otherwise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from control_plane.wire import parse_table
from sidecar.control.tablefile import load_table_file
from sidecar.errors import TableError

JSON = (
    '{"services": {"a": {"endpoints": [{"address": "10.0.0.1", "port": 80, "zone": "z"}],'
    ' "policy": {"hash_balance_factor": 1.5, "retry_on": ["reset", 503]}}}}'
)


@pytest.mark.parametrize(
    "text",
    [
        JSON,
        JSON.replace(": ", ":\n  "),
        "services:\n  a:\n    endpoints: [{address: 10.0.0.1, port: 80, zone: z}]\n",
    ],
)
def test_a_table_file_reads_as_yaml_reads_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "t.json"
    path.write_text(text)
    assert load_table_file(str(path)) == parse_table(yaml.safe_load(text))


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("1e1", "must be a number, got the string '1e1'"),  # YAML 1.1 has no 1e1
        ("NaN", "must be a number, got the string 'NaN'"),
    ],
)
def test_json_that_yaml_reads_otherwise_is_read_as_yaml(
    tmp_path: Path, value: str, says: str
) -> None:
    path = tmp_path / "t.json"
    path.write_text(f'{{"services": {{"a": {{"policy": {{"hash_balance_factor": {value}}}}}}}}}')
    with pytest.raises(TableError, match=f"services.a.policy.hash_balance_factor: {says}"):
        load_table_file(str(path))


def test_not_yaml_says_where(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("services: [")
    with pytest.raises(TableError, match="not valid YAML at line 1"):
        load_table_file(str(path))


def test_a_running_sidecar_imports_no_yaml() -> None:
    """yaml only reads YAML files: ~1 MB of a sidecar on a control plane or a JSON file."""
    code = "import sys, sidecar.app, sidecar.cli; print('yaml' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout == "False\n"
