"""A built-in toolbox for agents (``lms act``): time, directories, reading and creating files.

File tools only reach inside the working directory they were made for. ``create_file`` never
overwrites. Tools that change something carry ``lms_writes = True`` so that a front end can
ask before running them.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

MAX_READ_CHARS = 20_000
MAX_ENTRIES = 100  # names listed by analyze_directory; a huge folder is summed, not listed


def _inside(root: Path, path: str) -> Path:
    target = (root / path).resolve()
    if target != root and root not in target.parents:
        raise PermissionError(f"{path} is outside the working directory {root}.")
    return target


def make_toolbox(root: str | os.PathLike[str] | None = None) -> list[Callable[..., Any]]:
    """The four tools, confined to ``root`` (default: the current directory)."""
    base = Path(root or os.getcwd()).resolve()

    def get_current_time() -> str:
        """Get the current local date and time."""
        return datetime.now().astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")

    def analyze_directory(path: str = ".") -> dict[str, Any]:
        """List the files and folders in a directory of the working directory, and count
        everything under it (files by extension, folders, total size in bytes)."""
        folder = _inside(base, path)
        if not folder.is_dir():
            return {"error": f"{path} is not a directory."}
        kinds: Counter[str] = Counter()
        dirs = size = 0
        for entry in folder.rglob("*"):
            if entry.is_dir():
                dirs += 1
            elif entry.is_file():
                kinds[entry.suffix or "(no extension)"] += 1
                size += entry.stat().st_size
        # the names answer "what is in here?"; folders end with "/"
        names = sorted(e.name + "/" if e.is_dir() else e.name for e in folder.iterdir())
        if len(names) > MAX_ENTRIES:
            names = names[:MAX_ENTRIES] + [f"... and {len(names) - MAX_ENTRIES} more"]
        return {"path": str(folder), "entries": names,
                "files_by_extension": dict(kinds.most_common()),
                "total_files": sum(kinds.values()), "total_directories": dirs,
                "total_size_bytes": size}

    def read_file(path: str) -> str:
        """Read a text file of the working directory (long files are cut)."""
        target = _inside(base, path)
        if not target.is_file():
            return f"Error: {path} is not a file."
        text = target.read_text(encoding="utf-8", errors="replace")
        if len(text) > MAX_READ_CHARS:
            return text[:MAX_READ_CHARS] + f"\n[... cut: {len(text)} characters in all]"
        return text

    def create_file(name: str, content: str) -> str:
        """Create a file with the given name and content in the working directory."""
        target = _inside(base, name)
        if target.exists():
            return "Error: File already exists."
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        return "File created."

    create_file.lms_writes = True  # type: ignore[attr-defined]
    return [get_current_time, analyze_directory, read_file, create_file]
