"""Check that the README's two set-up commands are exactly the ones given: the ```bash block under
'## Quick start' and the one under '## Tests'. .ci/run names both commands and runs them after this check, so
the README and CI cannot drift apart.

    python .ci/readme_setup_commands.py QUICK_START_COMMAND TESTS_COMMAND
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def block_under(text: str, heading: str) -> str:
    section = re.search(rf"^## {re.escape(heading)}\b.*?$(.*?)(?=^## )", text, re.M | re.S)
    if not section:
        sys.exit(f"README.md has no '## {heading}' section")
    block = re.search(r"```bash\n(.*?)```", section.group(1), re.S)
    if not block:
        sys.exit(f"README.md: no ```bash block under '## {heading}'")
    lines = [line for line in block.group(1).splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if len(lines) != 1:
        sys.exit(f"README.md: the first block under '## {heading}' must hold exactly one command, found {len(lines)}")
    return lines[0].strip()


if __name__ == "__main__":
    text = README.read_text()
    expected = sys.argv[1:]
    if len(expected) != 2:
        sys.exit(__doc__)
    for heading, command in zip(("Quick start", "Tests"), expected):
        found = block_under(text, heading)
        if found != command:
            sys.exit(f"README.md's '{heading}' command is\n  {found}\nbut .ci/run runs\n  {command}\n"
                     f"make them the same")
    print("README.md's set-up commands are the ones CI runs")
