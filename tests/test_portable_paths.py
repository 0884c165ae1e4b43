"""No file under src/, tests/ or bench/ may name a path that exists only on one machine.

A home directory, a checkout under a fixed work directory or a venv's absolute path makes
the suite (or a benchmark's printed command) fail on every other machine, e.g. from a clean
clone. Programs and tests find their own interpreter with `sys.executable` instead.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Spelled in pieces so that this file does not match itself.
_PREFIXES = ("wo" + "rk", "ro" + "ot", "ho" + "me", "Us" + "ers")
MACHINE_PATH = re.compile(
    r"(?<![\w.~-])/(?:" + "|".join(_PREFIXES) + r")/[\w.-]"  # a home, root or work directory
    r"|(?<![\w.~-])/[\w./-]*/\.?venv/bin/"                     # any absolute venv
)
SKIP_DIRS = {"__pycache__", ".pytest_cache", "results"}


def _files() -> list[Path]:
    out = []
    for top in ("src", "tests", "bench"):
        for path in (ROOT / top).rglob("*"):
            if path.is_file() and not SKIP_DIRS.intersection(path.relative_to(ROOT).parts) \
                    and path.suffix in {".py", ".md", ".toml", ".txt", ".json", ".sh", ".cfg", ""}:
                out.append(path)
    return out


def test_the_pattern_catches_machine_paths() -> None:
    for bad in ("/" + "work/venv/bin/ztna", "/" + "root/pki", "x = '/" + "home/alice/ztna'",
                "/opt/tools/.venv" + "/bin/python"):
        assert MACHINE_PATH.search(bad), bad
    for fine in ("/run/ztna-agent", "/tmp/ztna-agent-0", ".venv/bin/pytest", "/dev/net/tun",
                 "under a 0700 /" + "root)"):
        assert not MACHINE_PATH.search(fine), fine


def test_no_absolute_machine_paths_in_src_tests_bench() -> None:
    hits = []
    for path in _files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}")
    assert not hits, "paths of one machine:\n" + "\n".join(hits)
