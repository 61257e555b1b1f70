"""meshlet's build: pyproject.toml holds the metadata; this file adds the compiled data path.

With a C compiler at hand, the modules in ``COMPILED`` are compiled with mypyc (as black and
mypy ship themselves); their ``.py`` files ship beside them and are what runs where no
compiler was (or with ``MESHLET_PURE=1`` at run time: see ``sidecar/__init__.py``).

``MESHLET_COMPILE`` at build time: unset compiles when a C compiler builds against this
Python's headers and builds pure Python otherwise; ``0`` never compiles; ``1`` compiles or
fails the build.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

from setuptools import Extension, setup

# The data path, compiled with mypyc. A folder stands for every module in it (its __init__.py
# stays Python); a file for itself. What is listed here must compile and behave as its .py does:
# typed without Any, no class or module state written at run time, ClassVar for class
# constants, no subclasses of Python classes on the hot path (mypyc makes those slow), and no
# test that patches its attributes (native classes refuse that: inject instead).
COMPILED = [
    "sidecar/http/",
    "sidecar/telemetry/",
    "sidecar/balancing/",
    "sidecar/resilience/",
    "sidecar/proxy/",
    "sidecar/errors.py",
    "sidecar/clock.py",
]

# The shared library's name, sidecar__mypyc (else a hash of the module list, which changes with
# it); sidecar/__init__.py looks for it
GROUP = "sidecar"


def compiled_sources() -> list[str]:
    files: list[str] = []
    for entry in COMPILED:
        path = Path(entry)
        if path.is_dir():
            files += sorted(str(p) for p in path.glob("*.py") if p.name != "__init__.py")
        elif path.is_file():
            files.append(entry)
        else:
            raise SystemExit(f"setup.py: COMPILED names {entry}, which is not there")
    return files


def no_compiler() -> str:
    """Why a C compiler cannot build an extension for this Python here, or ``""``."""
    cc = shlex.split(os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc")
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp, "probe.c")
        probe.write_text("#include <Python.h>\nint main(void) { return 0; }\n")
        include = [f"-I{sysconfig.get_paths()[key]}" for key in ("include", "platinclude")]
        try:
            built = subprocess.run(
                [*cc, *include, "-c", str(probe), "-o", str(Path(tmp, "probe.o"))],
                capture_output=True,
                check=False,
            )
        except OSError as e:
            return f"no C compiler ({cc[0]}: {e.strerror})"
        if built.returncode != 0:
            return f"{cc[0]} cannot build against Python's headers (python3-dev missing?)"
    return ""


def metadata_only() -> bool:
    """pip asks for the build's requirements and metadata (egg_info, dist_info) before it
    builds: mypyc's 20 s of code generation are wasted there."""
    commands = [arg for arg in sys.argv[1:] if not arg.startswith("-")]
    return bool(commands) and commands[0] in ("egg_info", "dist_info")


def remove_compiled() -> None:
    """Editable installs (and ``build_ext --inplace``) build into the source tree: a pure build
    must not leave an earlier build's compiled modules there to run, nor a compiled one those of
    modules since moved or no longer listed."""
    args = sys.argv[1:]
    if "editable_wheel" not in args and not ("build_ext" in args and "--inplace" in args):
        return
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    for path in [Path(GROUP + "__mypyc" + suffix), *Path("sidecar").rglob("*" + suffix)]:
        path.unlink(missing_ok=True)


def extensions() -> list[Extension]:
    wanted = os.environ.get("MESHLET_COMPILE", "")
    if wanted not in ("", "0", "1"):
        raise SystemExit(f"setup.py: MESHLET_COMPILE must be 0, 1 or unset, not {wanted!r}")
    if metadata_only():
        return []
    remove_compiled()
    if wanted == "0":
        print("meshlet: pure Python build (MESHLET_COMPILE=0)", file=sys.stderr)
        return []
    why_not = no_compiler()
    if why_not:
        if wanted == "1":
            raise SystemExit(f"setup.py: MESHLET_COMPILE=1, but {why_not}")
        print(f"meshlet: pure Python build: {why_not}", file=sys.stderr)
        return []
    from mypyc.build import mypycify

    cache = ["--cache-dir", str(Path("build", "mypyc-cache"))]  # not the mypy of `make typecheck`
    return mypycify([*cache, *compiled_sources()], group_name=GROUP)


setup(ext_modules=extensions())
