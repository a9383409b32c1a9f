"""Regenerate the committed completion scripts from the Typer app (``--check`` to verify).

    python completions/generate.py          # rewrite lms.bash, lms.zsh, lms.fish
    python completions/generate.py --check  # exit 1 if any is out of date
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHELLS = {"bash": "lms.bash", "zsh": "lms.zsh", "fish": "lms.fish"}


def script(shell: str) -> str:
    env = os.environ | {"_LMS_COMPLETE": f"source_{shell}"}
    return subprocess.run(
        [sys.executable, "-c", "from lmscli.cli.app import main; main()"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for shell, name in SHELLS.items():
        path = HERE / name
        text = script(shell)
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"Out of date: {', '.join(stale)}. Run: python completions/generate.py",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
