"""Print the README's two set-up commands, one per line: the ```bash block under '## Quick start' and the one
under '## Tests'. .ci/run runs exactly these, so the README and CI cannot drift apart."""
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
        sys.exit(f"README.md: the block under '## {heading}' must hold exactly one command, found {len(lines)}")
    return lines[0].strip()


if __name__ == "__main__":
    text = README.read_text()
    for heading in ("Quick start", "Tests"):
        print(block_under(text, heading))
