"""The docs name only tests that exist: every `tests/file.py::test_name` of the exit-code
table in docs/RELIABILITY.md (and of any other page) is a test function in that file."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_test_a_doc_names_exists():
    named = set()
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]:
        named |= {(f, t, page.name) for f, t in re.findall(r"(test_\w+\.py)::(test_\w+)", page.read_text())}
    assert named, "the exit-code table of docs/RELIABILITY.md names its tests as file.py::test_name"
    missing = []
    for file, test, page in sorted(named):
        path = ROOT / "tests" / file
        if not path.exists() or not re.search(rf"def {test}\(", path.read_text()):
            missing.append(f"{page}: {file}::{test}")
    assert missing == []
