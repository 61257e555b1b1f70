"""Package boundaries that DESIGN.md promises."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_control_plane_never_imports_the_sidecar_or_the_command() -> None:
    files = sorted((ROOT / "control_plane").glob("*.py"))
    assert files
    for path in files:
        bad = {m for m in imports(path) if m.split(".")[0] in ("sidecar", "meshlet")}
        assert not bad, f"{path.name} imports {bad}"


def test_sidecar_imports_only_wire_ring_and_flags_from_the_control_plane() -> None:
    # flags (argparse with MESHLET_ environment fallbacks) is standard library only, like wire
    allowed = {"control_plane.wire", "control_plane.ring", "control_plane.flags"}
    files = sorted((ROOT / "sidecar").rglob("*.py"))
    assert files
    for path in files:
        used = {m for m in imports(path) if m.split(".")[0] == "control_plane"}
        bad = {m for m in used if not any(m == a or m.startswith(f"{a}.") for a in allowed)}
        assert bad <= {"control_plane"}, f"{path.name} imports {bad}"


def test_shared_modules_are_standard_library_only() -> None:
    """But for wire.identity, which reads certificates (``cryptography``), and which no other
    module of wire imports at the top: the package stays light for who does not need it."""
    shared = [ROOT / "control_plane" / "flags.py", *(ROOT / "control_plane" / "wire").glob("*.py")]
    assert len(shared) > 3
    for path in shared:
        allowed = {"cryptography"} if path.name == "identity.py" else set()
        for module in imports(path):
            top = module.split(".")[0]
            own = module.startswith("control_plane.wire")
            assert own or top in sys.stdlib_module_names | allowed | {"__future__"}, (
                path,
                module,
            )


def test_importing_wire_does_not_import_cryptography() -> None:
    code = "import sys, control_plane.wire; sys.exit('cryptography' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
