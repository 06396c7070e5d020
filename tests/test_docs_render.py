"""The README and every doc render as written: PyMarkdown (pinned in requirements-dev.txt) with the project's
configuration (`.pymarkdown`: the rules about fences, headings, links and tables; style rules off) and its
fence rule (`.ci/markdown_fences.py`: a fence followed by text does not close a code block) finds nothing.
The rule set is shown to fail on the breakages it is there for. In process (PyMarkdown's API: what
`pymarkdown scan README.md docs` reports from the repository root), so it belongs to the fast tier."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from pymarkdown.api import PyMarkdownApi

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
    monkeypatch.chdir(ROOT)  # where `pymarkdown scan` runs: .pymarkdown names its plugin relative to it
    # PyMarkdown puts its plugin folders (one holds a package named `utils`) in front of sys.path: on a copy,
    # so that later tests (and the processes they spawn, which inherit sys.path) import our `utils` again
    monkeypatch.setattr(sys, "path", list(sys.path))


def lint(*paths: Path) -> list[str]:
    """What ``pymarkdown scan PATH...`` reports from the repository root, one line per problem."""
    problems = []
    for path in paths:
        result = PyMarkdownApi().configuration_file_path(str(ROOT / ".pymarkdown")).scan_path(str(path))
        problems += [f"{f.scan_file}:{f.line_number}:{f.column_number}: {f.rule_id}: {f.rule_description}"
                     f"{f.extra_error_information or ''}" for f in result.scan_failures]
    return problems


def test_readme_and_every_doc_pass_the_linter():
    assert len(DOCUMENTS) > 1
    problems = lint(*DOCUMENTS)
    assert not problems, "markdown problems (fix them; rules in .pymarkdown):\n" + "\n".join(problems)


BROKEN = {
    # The README once had this: the closing fence followed by text keeps the block open, so the heading and
    # the command after it render as code.
    "fence followed by text": ("# Title\n\n## Quick start\n\n```bash\npython main.py\n``` then more text\n\n"
                               "## Tests\n\n```bash\npytest -q\n```\n", "VSL001"),
    "heading without a space": "# Title\n\n##Tests\n\ntext\n",
    "heading level skipped": "# Title\n\n### Tests\n\ntext\n",
    "fence glued to a paragraph": "# Title\n\nSome text\n```bash\npytest -q\n```\n",
    "link to a missing section": "# Title\n\nSee [the tests](#tests).\n\n## Other\n\ntext\n",
    "table row with a missing cell": "# Title\n\n| a | b |\n|---|---|\n| 1 |\n",
}


@pytest.mark.parametrize("name", list(BROKEN))
def test_each_breakage_fails_the_linter(name, tmp_path):
    text, rule = BROKEN[name] if isinstance(BROKEN[name], tuple) else (BROKEN[name], None)
    path = tmp_path / "doc.md"
    path.write_text(text)
    problems = lint(path)
    assert problems, f"{name}: not reported"
    if rule:
        assert any(f"doc.md:7:1: {rule}:" in problem for problem in problems), problems


def test_a_sound_document_passes(tmp_path):
    path = tmp_path / "doc.md"
    path.write_text("# Title\n\n## Quick start\n\nSee [the tests](#tests).\n\n```bash\npython main.py  # a comment\n"
                    "```\n\nText after the block.\n\n## Tests\n\n| a | b |\n|---|---|\n| 1 | 2 |\n\n```\nplain output\n```\n")
    assert lint(path) == []
