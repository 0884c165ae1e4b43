"""The pure core imports no I/O, clocks or randomness (style convention 1).

Scans every `.py` file of the packages in PURE_PACKAGES, and the single modules in
PURE_MODULES, with `ast` and fails on an import of a forbidden module (or any of its
submodules), whether `import x`, `from x import y`, or an import nested inside a function.
Packages whose directory does not exist yet are skipped, so others can list theirs here
before writing them; a listed module that does not exist fails.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Extend this tuple to put more packages under the rule.
PURE_PACKAGES: tuple[str, ...] = ("ztna/wire", "ztna/netstack", "ztna/p2p", "ztna/names", "ztna/link")
# Pure modules inside packages that also hold drivers.
PURE_MODULES: tuple[str, ...] = ("ztna/intermediate/registry.py", "ztna/intermediate/signaling.py",
                                 "ztna/quic/admission.py", "ztna/agent/services.py",
                                 "ztna/connector/resume.py", "ztna/connector/health_state.py",
                                 "ztna/intermediate/relay.py", "ztna/intermediate/peers.py",
                                 "ztna/intermediate/qad.py", "ztna/intermediate/metrics.py",
                                 "ztna/metrics.py", "ztna/early.py")
# The drivers inside pure packages: the one place each package does its I/O.
DRIVER_MODULES: frozenset[str] = frozenset({"ztna/link/driver.py"})
FORBIDDEN: frozenset[str] = frozenset({"asyncio", "socket", "time", "random", "os", "aioquic"})


def _pure_files() -> list[Path]:
    files: list[Path] = []
    for package in PURE_PACKAGES:
        directory = SRC / package
        if directory.is_dir():
            files.extend(p for p in sorted(directory.glob("*.py"))
                         if str(p.relative_to(SRC)) not in DRIVER_MODULES)
    return files + [SRC / module for module in PURE_MODULES]


def forbidden_imports(source: str) -> list[str]:
    """Forbidden top-level module names imported anywhere in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in FORBIDDEN]
    return found


def test_scanner_catches_every_form() -> None:
    assert forbidden_imports("import os") == ["os"]
    assert forbidden_imports("import os.path as p") == ["os.path"]
    assert forbidden_imports("from aioquic.quic import connection") == ["aioquic.quic"]
    assert forbidden_imports("def f():\n    import time\n") == ["time"]
    assert forbidden_imports("import hmac, struct\nfrom . import time") == []
    assert forbidden_imports("import randomness") == []


def test_wire_is_scanned() -> None:
    assert any(p.parent.name == "wire" for p in _pure_files())


def test_listed_modules_exist() -> None:
    assert [m for m in PURE_MODULES if not (SRC / m).is_file()] == []


@pytest.mark.parametrize("path", _pure_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_pure_module_imports(path: Path) -> None:
    bad = forbidden_imports(path.read_text(encoding="utf-8"))
    assert not bad, f"{path.relative_to(SRC)} imports {bad}"
