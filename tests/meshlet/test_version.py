"""``meshlet --version``: the release, and which build of the sidecar runs."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import sidecar
from meshlet import __version__
from meshlet.cli import main

MESHLET = str(Path(sys.executable).with_name("meshlet"))


def version(**env: str) -> str:
    done = subprocess.run(
        [MESHLET, "--version"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stderr == ""
    return done.stdout


def test_version_names_the_build_that_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"meshlet {__version__} ({sidecar.__build__})\n"
    if sidecar.__compiled__:
        assert sidecar.__build__ == "compiled with mypyc"


def test_version_under_meshlet_pure() -> None:
    library = Path(sidecar.__path__[0]).parent / f"sidecar__mypyc{EXTENSION_SUFFIXES[0]}"
    pure = "pure Python, MESHLET_PURE=1" if library.exists() else "pure Python"
    assert version(MESHLET_PURE="1") == f"meshlet {__version__} ({pure})\n"
