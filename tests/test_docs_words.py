"""What a user reads (README.md, docs/*.md) speaks about the software, not about how its
development is organised: no issue numbers, no sessions or helpers of the people who built it."""

from __future__ import annotations

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each pattern with an example of the wording it catches.
INTERNAL = [
    r"\bissue\s*#?\d+",  # "Beyond the paper's merge (issue 12)"
    r"\bissue's\b",  # "the 2x target"
    r"\bthe issue\b",  # "the issue asks for"
    r"\bsessions?\b",  # "no session has had a GPU", "(this session)"
    r"\bnot drawn\b",  # the device tool's status
    r"\bworktree\b",
    r"\blead engineer\b",
]


def _user_docs() -> list[str]:
    return [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]


def test_patterns_catch_the_wording_they_are_for():
    samples = ["Beyond the paper's merge (issue 12):", "the issue's 2x target", "no session has had a GPU",
               "the device tool's status: \"not drawn\"", "(this session)"]
    for text in samples:
        assert any(re.search(p, text, re.I) for p in INTERNAL), text
    assert not any(re.search(p, "tissue sessile issued", re.I) for p in INTERNAL)


def test_readme_and_docs_hold_no_project_internal_words():
    found = []
    for path in _user_docs():
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                found += [f"{os.path.relpath(path, REPO)}:{n}: {line.strip()[:120]}"
                          for p in INTERNAL if re.search(p, line, re.I)]
    assert len(_user_docs()) >= 4 and not found, "\n".join(found)
