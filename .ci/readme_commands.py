"""Print one of the README's two set-up commands, so CI runs exactly what a new user pastes.

Usage: python3 .ci/readme_commands.py main|test. The commands are the two ```bash blocks of the README's
"## Set-up" section, in order: the main job, then the tests. Anything else there is an error, so a README that
drifts from this shape fails CI instead of silently testing something else.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def setup_commands(text: str) -> dict[str, str]:
    """{'main': ..., 'test': ...} from the README's Set-up section (each block one command, on one line)."""
    m = re.search(r"^## Set-up.*?$(.*?)(?=^## )", text, re.S | re.M)
    if m is None:
        raise SystemExit("README.md has no '## Set-up' section")
    blocks = [b.strip() for b in re.findall(r"^```bash\n(.*?)^```", m.group(1), re.S | re.M)]
    if len(blocks) != 2 or any("\n" in b for b in blocks):
        raise SystemExit(f"README.md's Set-up section must hold exactly two one-line bash blocks, found {blocks!r}")
    return {"main": blocks[0], "test": blocks[1]}


if __name__ == "__main__":
    print(setup_commands(README.read_text())[sys.argv[1]])
