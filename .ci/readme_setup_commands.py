"""Check that the README's two set-up commands are exactly the ones given: the first ```bash block under
'## Quick start' and the first under '## Tests' whose commands are not all marked `# needs: ...` (a step only
some machines take, such as the CPU build of torch on a machine without a GPU). .ci/run names both commands and
runs them after this check, so the README and CI cannot drift apart.

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
    blocks = [[line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]
              for block in re.findall(r"^```bash\n(.*?)^```$", section.group(1), re.S | re.M)]
    blocks = [lines for lines in blocks if not all(re.search(r"#\s*needs:", line) for line in lines)]
    if not blocks:
        sys.exit(f"README.md: no ```bash block under '## {heading}'")
    if len(blocks[0]) != 1:
        sys.exit(f"README.md: the first block under '## {heading}' must hold exactly one command, found {len(blocks[0])}")
    return blocks[0][0].strip()


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
