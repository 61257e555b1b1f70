"""meshlet's sidecar: the data-path proxy beside every service.

Its data path may be compiled with mypyc (``COMPILED`` in setup.py): each compiled module has
its ``.py`` beside it, which behaves the same. ``MESHLET_PURE`` in the environment chooses:

- unset: the compiled modules where they were built, else the Python source;
- ``1``: the Python source, even where compiled modules are installed (a finder put in front
  of the import system here loads ``sidecar.*`` from ``.py`` files only);
- ``0``: the compiled modules: ``meshlet sidecar`` refuses to start without them (exit 2).

``__compiled__`` says which runs, ``__build__`` says it in words (``meshlet --version`` and
``/config_dump`` show it). In a source tree (an editable install), compiled modules older than
their source, or than setup.py, are passed over for the source: ``make`` rebuilds them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import (
    EXTENSION_SUFFIXES,
    SOURCE_SUFFIXES,
    FileFinder,
    ModuleSpec,
    SourceFileLoader,
)
from types import ModuleType

LIBRARY = "sidecar__mypyc"
"""mypyc's shared library of the compiled modules, beside this package (``GROUP`` in setup.py)"""
PURE = "MESHLET_PURE"


class SourceFinder(MetaPathFinder):
    """Finds this package's modules as ``.py`` source, never as compiled extensions."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if path is None or not fullname.startswith(__name__ + "."):
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(
                fullname, target
            )
            if spec is not None:
                return spec
        return None


def _extension(name: str) -> str:
    """The module name of a compiled file's name (``proxy`` of ``proxy.cpython-311-….so``)."""
    for suffix in EXTENSION_SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return ""


def stale_source(package: str) -> str:
    """In a source tree, the first file changed since the compiled modules were built."""
    root = os.path.dirname(package)
    setup = os.path.join(root, "setup.py")
    if not os.path.exists(setup):
        return ""  # installed from a wheel: source and compiled modules came together
    built = os.stat(os.path.join(root, LIBRARY + EXTENSION_SUFFIXES[0])).st_mtime
    sources = [setup]
    for folder, _, names in os.walk(package):
        sources += [os.path.join(folder, m + ".py") for m in map(_extension, names) if m]
    for source in sources:
        if not os.path.exists(source) or os.stat(source).st_mtime > built:
            return os.path.relpath(source, root)
    return ""


def _choose(package: str) -> tuple[bool, str]:
    """Whether the compiled modules run, and in words which build runs and why."""
    if not os.path.exists(os.path.join(os.path.dirname(package), LIBRARY + EXTENSION_SUFFIXES[0])):
        return False, "pure Python"
    if os.environ.get(PURE, "") == "1":
        why = f"{PURE}=1"
    else:
        stale = stale_source(package)
        if not stale:
            return True, "compiled with mypyc"
        why = f"{stale} changed since it was compiled"
    import sys

    sys.meta_path.insert(0, SourceFinder())
    return False, f"pure Python, {why}"


def build() -> dict[str, str | bool]:
    """The build, as ``/config_dump`` shows it."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        release = version("meshlet")
    except PackageNotFoundError:  # a source tree that is not installed
        release = "0+unknown"
    return {"version": release, "compiled": __compiled__, "runs": __build__}


def build_error() -> str:
    """Why this process must not run as the environment asks, or ``""``."""
    wanted = os.environ.get(PURE, "")
    if wanted not in ("", "0", "1"):
        return f"{PURE} must be 1 (pure Python), 0 (compiled) or unset, not {wanted!r}"
    if wanted == "0" and not __compiled__:
        return f"{PURE}=0 asks for the compiled build, but this runs {__build__}"
    return ""


__compiled__, __build__ = _choose(__path__[0])
