"""Control messages are events, and each program has one packet demux.

The connection (`ztna.quic.connection`) owns the control-stream decoder and hands typed
messages to its handler's `on_message`; programs dispatch them through a table (type ->
handler), not by the class's name. A session's packet callback is fixed when it is built:
nobody reassigns it later (with several owners the last one silently won)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ztna"
DECODER_HOMES = {SRC / "quic" / "connection.py"}


def _sources() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py") if "wire" not in p.relative_to(SRC).parts)


def _is_type_name(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "__name__"
            and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "type")


def _name_dispatch(tree: ast.AST) -> list[int]:
    """Lines that branch on a class's `__name__` (compared, or tested with startswith)."""
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("startswith", "endswith") and _is_type_name(node.func.value):
            lines.append(node.lineno)
        elif isinstance(node, ast.Compare) and any(map(_is_type_name, [node.left, *node.comparators])):
            lines.append(node.lineno)
    return lines


def _late_on_packet(tree: ast.AST) -> list[int]:
    """Lines that assign an `on_packet` attribute, except an object's own in its `__init__`."""
    lines = []
    for func in ast.walk(tree):
        if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(func):
            if isinstance(node, ast.Assign):
                lines += [t.lineno for t in node.targets
                          if isinstance(t, ast.Attribute) and t.attr == "on_packet"
                          and not (func.name == "__init__" and getattr(t.value, "id", "") == "self")]
    return sorted(set(lines))


def _own_decoders(tree: ast.AST) -> list[int]:
    """Lines that build a ControlDecoder (only the connection may)."""
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "ControlDecoder"]


def test_the_scanners_find_what_they_look_for() -> None:
    tree = ast.parse("if type(m).__name__.startswith('Punch') or type(m).__name__ == 'E': pass\n"
                     "class A:\n def __init__(self, s): self.on_packet = f; s.on_packet = h\n"
                     " def later(self, s): s.on_packet = g\n"
                     "d = ControlDecoder()\n")
    assert _name_dispatch(tree) == [1, 1]
    assert _name_dispatch(ast.parse("log(type(exc).__name__)")) == []
    assert _late_on_packet(tree) == [3, 4]
    assert _own_decoders(tree) == [5]


def test_no_dispatch_by_name_no_late_packet_callbacks_no_private_decoders() -> None:
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text())
        rel = path.relative_to(SRC.parent)
        found += [f"{rel}:{n} dispatches on type(...).__name__" for n in _name_dispatch(tree)]
        found += [f"{rel}:{n} reassigns on_packet" for n in _late_on_packet(tree)]
        if path not in DECODER_HOMES:
            found += [f"{rel}:{n} builds its own ControlDecoder" for n in _own_decoders(tree)]
    assert found == []
