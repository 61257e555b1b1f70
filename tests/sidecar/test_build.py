"""The compiled build and its pure-Python twin: which one runs, ``MESHLET_PURE``, and compiled
modules that a source tree has outgrown (setup.py, sidecar/__init__.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path

import pytest

import sidecar
import sidecar.app  # every module of the data path
from sidecar.cli import main

COMPILED = EXTENSION_SUFFIXES[0]


def compiled_modules() -> list[str]:
    return sorted(
        name
        for name, module in list(sys.modules.items())
        if name.startswith("sidecar.")
        and (getattr(module, "__file__", None) or "").endswith(COMPILED)
    )


def run(code: str, **env: str) -> str:
    """What ``python -c code`` prints, in a fresh process with ``env`` added."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_compiled_modules_run_exactly_when_it_says_so() -> None:
    """Under ``MESHLET_PURE=1`` (``make pytest-pure``) too: then nothing here is compiled."""
    if sidecar.__compiled__:
        assert sidecar.__build__ == "compiled with mypyc"
        assert {"sidecar.errors", "sidecar.clock"} <= set(compiled_modules())
        assert "sidecar__mypyc" in sys.modules
    else:
        assert sidecar.__build__.startswith("pure Python")
        assert compiled_modules() == []
        assert "sidecar__mypyc" not in sys.modules


def test_meshlet_pure_runs_the_python_source() -> None:
    code = (
        "import sidecar, sidecar.app, sys; print(sidecar.__compiled__, sidecar.__build__); "
        "print(sorted(n for n, m in sys.modules.items() if n.startswith('sidecar') and "
        "not (getattr(m, '__file__', None) or '.py').endswith('.py')))"
    )
    compiled, loaded = run(code, MESHLET_PURE="1").splitlines()
    if (Path(sidecar.__path__[0]).parent / f"sidecar__mypyc{COMPILED}").exists():
        assert compiled == "False pure Python, MESHLET_PURE=1"
    else:
        assert compiled == "False pure Python"
    assert loaded == "[]"


@pytest.mark.parametrize(
    ("pure", "compiled", "refused"),
    [
        ("0", False, "MESHLET_PURE=0 asks for the compiled build, but this runs pure Python"),
        ("0", True, ""),
        ("1", True, ""),
        ("", False, ""),
        ("yes", True, "MESHLET_PURE must be 1 (pure Python), 0 (compiled) or unset, not 'yes'"),
    ],
)
def test_a_sidecar_that_cannot_run_as_asked_does_not_start(
    pure: str,
    compiled: bool,
    refused: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MESHLET_PURE", pure)
    monkeypatch.setattr(sidecar, "__compiled__", compiled)
    monkeypatch.setattr(sidecar, "__build__", "compiled with mypyc" if compiled else "pure Python")
    assert sidecar.build_error() == refused
    if refused:
        assert main(["--service", "web"], prog="meshlet sidecar") == 2
        assert capsys.readouterr().err == f"meshlet sidecar: error: {refused}\n"


def source_tree(root: Path, *, built: float) -> Path:
    """A package with one compiled module, its library and setup.py, all as old as ``built``."""
    package = root / "pkg"
    package.mkdir()
    for path in (root / "setup.py", package / "mod.py", package / "__init__.py"):
        path.write_text("")
        os.utime(path, (built - 10, built - 10))
    for path in (package / f"mod{COMPILED}", root / f"sidecar__mypyc{COMPILED}"):
        path.write_bytes(b"")
        os.utime(path, (built, built))
    return package


def test_compiled_modules_older_than_their_source_are_passed_over(tmp_path: Path) -> None:
    package = source_tree(tmp_path, built=1_000_000.0)
    assert sidecar.stale_source(str(package)) == ""
    (package / "__init__.py").touch()  # not compiled: no matter
    assert sidecar.stale_source(str(package)) == ""
    (package / "mod.py").touch()
    assert sidecar.stale_source(str(package)) == "pkg/mod.py"


def test_a_changed_setup_py_or_a_module_gone_means_a_rebuild(tmp_path: Path) -> None:
    package = source_tree(tmp_path, built=1_000_000.0)
    (tmp_path / "setup.py").touch()
    assert sidecar.stale_source(str(package)) == "setup.py"
    os.utime(tmp_path / "setup.py", (0, 0))
    (package / "mod.py").unlink()  # moved elsewhere: its compiled module is left behind
    assert sidecar.stale_source(str(package)) == "pkg/mod.py"


def test_an_installed_package_is_never_stale(tmp_path: Path) -> None:
    package = source_tree(tmp_path, built=1_000_000.0)
    (tmp_path / "setup.py").unlink()  # site-packages: no setup.py beside the package
    (package / "mod.py").touch()
    assert sidecar.stale_source(str(package)) == ""
