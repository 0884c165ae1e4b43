"""Comments say why in their own words: none cites a numbered defect or issue, which a reader
of this repository cannot look up."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"\b(?:defect|issue) ?#?\d+\b", re.IGNORECASE)


def _citations(text: str) -> list[str]:
    return CITATION.findall(text)


def test_the_pattern_catches_citations() -> None:
    assert _citations("data on the SYN is kept (defect 25)") == ["defect 25"]
    assert _citations("# see issue 8") == ["issue 8"]
    assert _citations("tissue 3, an issue with TLS") == []


def test_no_source_file_cites_a_numbered_defect_or_issue() -> None:
    hits = []
    for folder in ("src", "tests", "bench", "native/src", "native/tests"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".rs") or path.name == Path(__file__).name:
                continue
            for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if _citations(line):
                    hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert hits == [], "\n".join(hits)
