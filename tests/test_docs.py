"""The documentation points at tests that exist: every `test_file.py::test_name` in docs/errors.md is a real test."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_named_in_the_error_table_exists():
    text = (ROOT / "docs" / "errors.md").read_text()
    named = re.findall(r"`(test_\w+\.py)::(test_\w+)(?:\[[^\]]*\])?`", text)
    assert len(named) >= 30
    for filename, test in named:
        source = (ROOT / "tests" / filename).read_text()
        assert re.search(rf"^def {test}\(", source, re.MULTILINE), f"{filename}::{test} is not a test"
    # a cell may name more tests of the same file after a comma: `test_a.py::test_x`, `test_y`
    more = r"`(test_\w+\.py)::test_\w+`(?: \(fuzz\))?((?:, `test_\w+`(?: \(fuzz\))?)+)"
    for filename, others in re.findall(more, text):
        source = (ROOT / "tests" / filename).read_text()
        for test in re.findall(r"`(test_\w+)`", others):
            assert re.search(rf"^def {test}\(", source, re.MULTILINE), f"{filename}::{test} is not a test"
