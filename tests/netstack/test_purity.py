"""The netstack core imports no I/O, clock or randomness modules (convention 1)."""

from __future__ import annotations

import ast
import pathlib

import ztna.netstack

FORBIDDEN = {"asyncio", "socket", "time", "random", "os", "aioquic", "select"}


def test_netstack_imports_no_io() -> None:
    root = pathlib.Path(ztna.netstack.__file__).parent
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in FORBIDDEN, f"{path.name} imports {name}"
