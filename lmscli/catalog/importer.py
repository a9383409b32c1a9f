"""``lms import``: put a GGUF file that is already on disk into the model store."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmscli import paths
from lmscli.catalog.gguf import GGUFFormatError, read_gguf_metadata
from lmscli.catalog.store import strip_quant_suffix
from lmscli.errors import InvalidModelFileError, UserInputError

ImportMode = Literal["move", "copy", "symlink", "hardlink"]
IMPORT_MODES: tuple[str, ...] = ("move", "copy", "symlink", "hardlink")

_USER_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass(frozen=True)
class ImportResult:
    target: Path
    mode: str
    dry_run: bool


def default_user_repo(src: Path) -> str:
    """``$USER/<file name minus quant suffix and extension>``, as lms does with ``-y``."""
    user = _safe_segment(os.environ.get("USER") or "") or "local"
    repo = _safe_segment(strip_quant_suffix(Path(src.name).stem)) or "model"
    return f"{user}/{repo}"


def _safe_segment(text: str) -> str:
    # Folder names must stay one path segment and match the user/repo pattern.
    cleaned = re.sub(r"[^\w.-]+", "-", text).strip("-.")
    return cleaned


def _check_source(src: Path) -> None:
    if not src.exists():
        raise UserInputError(
            f"File not found: {src}", hint="Usage: lms import ~/Downloads/model.Q4_K_M.gguf"
        )
    if not src.is_file():
        raise UserInputError(f"Not a file: {src}", hint="Give the path of a .gguf file.")
    try:
        read_gguf_metadata(src)
    except InvalidModelFileError as exc:
        reason = exc.reason if isinstance(exc, GGUFFormatError) else exc.message
        raise InvalidModelFileError(
            f"{src.name} is not a GGUF model file: {reason}",
            hint="Only .gguf model files can be imported.",
        ) from None


def _target_for(src: Path, user_repo: str | None, models_dir: Path | None) -> Path:
    repo = user_repo if user_repo is not None else default_user_repo(src)
    if not _USER_REPO_RE.match(repo):
        raise UserInputError(
            f"Invalid --user-repo {repo!r}: expected the form user/repo.",
            hint="Example: --user-repo my-name/my-model",
        )
    root = Path(models_dir) if models_dir else paths.models_dir()
    return root.joinpath(*repo.split("/"), src.name)


def import_model(
    src: Path,
    *,
    mode: ImportMode = "move",
    user_repo: str | None = None,
    dry_run: bool = False,
    models_dir: Path | None = None,
) -> ImportResult:
    """Move, copy or link ``src`` to ``<models>/<user>/<repo>/<file name>``."""
    if mode not in IMPORT_MODES:
        raise UserInputError(f"Unknown import mode {mode!r}; use one of {', '.join(IMPORT_MODES)}.")
    src = Path(os.path.abspath(Path(src).expanduser()))
    _check_source(src)
    target = _target_for(src, user_repo, models_dir)
    if target.exists() or target.is_symlink():
        raise UserInputError(f"Target file already exists: {target}")
    if not dry_run:
        target.parent.mkdir(parents=True, exist_ok=True)
        _place(src, target, mode)
    return ImportResult(target=target, mode=mode, dry_run=dry_run)


def _place(src: Path, target: Path, mode: str) -> None:
    try:
        if mode == "move":
            shutil.move(str(src), str(target))
        elif mode == "copy":
            _copy_atomic(src, target)
        elif mode == "hardlink":
            os.link(src, target)
        else:
            os.symlink(src, target)
    except OSError as exc:
        raise UserInputError(_place_error(exc, mode, target)) from None


def _place_error(exc: OSError, mode: str, target: Path) -> str:
    if exc.errno == errno.EXDEV and mode == "hardlink":
        return "Cannot hard-link across file systems; use --copy or --symbolic-link instead."
    return f"Could not {mode} the file to {target}: {exc.strerror or exc}"


def _copy_atomic(src: Path, target: Path) -> None:
    # A hidden temp name keeps a half-copied file out of ``lms ls`` if the copy is interrupted.
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(fd)
    try:
        shutil.copy2(src, tmp)
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
