"""The local model store: ``<models_dir>/<publisher>/<repo>/<file>.gguf``.

Parsing every GGUF header on each ``lms ls`` would be slow with many models, so parsed metadata
is cached in one JSON file keyed by absolute path and invalidated by size + mtime.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscli import paths
from lmscli.catalog.gguf import (
    QUANT_SUFFIX_RE,
    GGUFMetadata,
    format_params,
    read_gguf_metadata,
)
from lmscli.errors import InvalidModelFileError

_CACHE_VERSION = 1
# Vision projectors ship next to the model but are not models one can load on their own.
_PROJECTOR_ARCHITECTURES = frozenset({"clip"})


@dataclass(frozen=True)
class LocalModel:
    model_key: str
    path: str
    abs_path: Path
    publisher: str
    repo: str
    file_name: str
    display_name: str
    size_bytes: int
    type: str
    architecture: str
    params_string: str | None
    quantization: str | None
    bits: float | None
    max_context_length: int | None
    trained_for_tool_use: bool
    chat_template: str | None

    def model_info(self) -> dict[str, Any]:
        """LM Studio's ``ModelInfo`` as returned by ``listDownloadedModels``."""
        quant = None
        if self.quantization:
            quant = {"name": self.quantization, "bits": self.bits}
        return {
            "type": self.type,
            "modelKey": self.model_key,
            "format": "gguf",
            "displayName": self.display_name,
            "publisher": self.publisher,
            "path": self.path,
            "sizeBytes": self.size_bytes,
            "indexedModelIdentifier": self.path,
            "deviceIdentifier": None,
            "paramsString": self.params_string,
            "architecture": self.architecture,
            "quantization": quant,
            "vision": False,
            "trainedForToolUse": self.trained_for_tool_use,
            "maxContextLength": self.max_context_length,
        }


def strip_quant_suffix(stem: str) -> str:
    """``SmolLM2-135M-Instruct.Q4_1`` -> ``SmolLM2-135M-Instruct``."""
    return QUANT_SUFFIX_RE.sub("", stem)


def base_key(file_name: str) -> str:
    return strip_quant_suffix(Path(file_name).stem).lower()


def nominal_bits(quantization: str | None) -> float | None:
    """Bits LM Studio reports for a quant name: Q4_K_M -> 4, F16 -> 16, IQ2_XS -> 2."""
    if not quantization:
        return None
    q = quantization.upper()
    if q in ("F16", "BF16"):
        return 16
    if q == "F32":
        return 32
    digits = q.lstrip("IQT")[:1]
    return int(digits) if digits.isdigit() else None


# --- metadata cache -------------------------------------------------------------------------


def _load_cache(cache_file: Path) -> dict[str, Any]:
    try:
        data = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    ok = isinstance(data, dict) and data.get("version") == _CACHE_VERSION
    entries = data.get("entries") if ok else None
    return entries if isinstance(entries, dict) else {}


def _save_cache(cache_file: Path, entries: dict[str, Any]) -> None:
    # Atomic replace: a concurrent reader (the server) never sees half a file. Failing to
    # write (read-only home) only costs speed, so errors are swallowed.
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".cache-", suffix=".tmp", dir=cache_file.parent)
    except OSError:
        return
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({"version": _CACHE_VERSION, "entries": entries}, fh)
        os.replace(tmp, cache_file)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _meta_to_json(meta: GGUFMetadata) -> dict[str, Any]:
    return {f.name: getattr(meta, f.name) for f in dataclasses.fields(meta) if f.name != "kv"}


def _meta_from_json(data: Any) -> GGUFMetadata | None:
    try:
        return GGUFMetadata(**data)
    except TypeError:
        return None


# --- scanning -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Found:
    abs_path: Path
    rel: str
    size: int
    meta: GGUFMetadata


def _iter_gguf_files(root: Path) -> list[Path]:
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Dot-folders hold lmscli internals and partial downloads.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(
            Path(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(".gguf") and not f.startswith(".")
        )
    return found


def _cached_meta(
    path: Path, st: os.stat_result, cache: dict[str, Any]
) -> tuple[GGUFMetadata, bool]:
    """The metadata for ``path`` and whether the cache had to be updated."""
    key = str(path)
    entry = cache.get(key)
    if (
        isinstance(entry, dict)
        and entry.get("size") == st.st_size
        and entry.get("mtime_ns") == st.st_mtime_ns
    ):
        meta = _meta_from_json(entry.get("meta"))
        if meta is not None:
            return meta, False
    meta = read_gguf_metadata(path)
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "meta": _meta_to_json(meta)}
    return meta, True


@dataclass
class _Scan:
    found: list[_Found] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)
    seen: set[str] = dataclasses.field(default_factory=set)
    cache_changed: bool = False


def _scan_files(root: Path, cache: dict[str, Any]) -> _Scan:
    scan = _Scan()
    for path in _iter_gguf_files(root):
        rel = path.relative_to(root).as_posix()
        scan.seen.add(str(path))
        if rel.count("/") < 2:
            scan.problems.append(f"{rel}: not in a <publisher>/<repo>/ folder; use lms import")
            continue
        try:
            st = path.stat()
            meta, updated = _cached_meta(path, st, cache)
        except InvalidModelFileError as exc:
            scan.problems.append(f"{rel}: {exc.message}")
            continue
        except OSError as exc:
            scan.problems.append(f"{rel}: {exc.strerror or exc}")
            continue
        scan.cache_changed |= updated
        if meta.architecture not in _PROJECTOR_ARCHITECTURES:
            scan.found.append(_Found(path, rel, st.st_size, meta))
    return scan


def _prune(cache: dict[str, Any], root: Path, alive: set[str]) -> bool:
    prefix = str(root) + os.sep
    stale = [k for k in cache if k.startswith(prefix) and k not in alive]
    for k in stale:
        del cache[k]
    return bool(stale)


# --- keys -----------------------------------------------------------------------------------


def _assign_keys(found: list[_Found]) -> list[str]:
    """Model keys for ``found`` (same order); clashing keys get ``@quant``, then the path."""
    keys = [base_key(f.abs_path.name) for f in found]
    keys = _disambiguate(keys, [_quant_key(k, f) for k, f in zip(keys, found, strict=True)])
    return _disambiguate(keys, [f.rel for f in found])


def _quant_key(key: str, f: _Found) -> str:
    return f"{key}@{f.meta.quantization.lower()}" if f.meta.quantization else f.rel


def _disambiguate(keys: list[str], alternatives: list[str]) -> list[str]:
    groups: dict[str, list[int]] = defaultdict(list)
    for i, k in enumerate(keys):
        groups[k.lower()].append(i)
    out = list(keys)
    for members in groups.values():
        if len(members) > 1:
            for i in members:
                out[i] = alternatives[i]
    return out


def _to_local_model(f: _Found, key: str) -> LocalModel:
    meta = f.meta
    parts = f.rel.split("/")
    params = meta.size_label or (
        format_params(meta.parameter_count) if meta.parameter_count else None
    )
    return LocalModel(
        model_key=key,
        path=f.rel,
        abs_path=f.abs_path,
        publisher=parts[0],
        repo=parts[1],
        file_name=parts[-1],
        display_name=meta.name or Path(parts[-1]).stem,
        size_bytes=f.size,
        type="embedding" if meta.is_embedding else "llm",
        architecture=meta.architecture,
        params_string=params,
        quantization=meta.quantization,
        bits=nominal_bits(meta.quantization) or meta.bits_per_weight,
        max_context_length=meta.context_length,
        trained_for_tool_use=meta.supports_tools,
        chat_template=meta.chat_template,
    )


# --- public API -----------------------------------------------------------------------------


def scan_models(models_dir: Path | None = None) -> tuple[list[LocalModel], list[str]]:
    """All loadable models sorted by key, and one problem line per skipped file."""
    root = Path(os.path.abspath(models_dir or paths.models_dir()))
    if not root.is_dir():
        return [], []
    cache_file = paths.metadata_cache_file()
    cache = _load_cache(cache_file)
    scan = _scan_files(root, cache)
    if _prune(cache, root, scan.seen) or scan.cache_changed:
        _save_cache(cache_file, cache)
    found = scan.found
    models = [_to_local_model(f, k) for f, k in zip(found, _assign_keys(found), strict=True)]
    models.sort(key=lambda m: (m.model_key.lower(), m.path))
    return models, scan.problems


def list_models(models_dir: Path | None = None) -> list[LocalModel]:
    return scan_models(models_dir)[0]


def find_model(query: str, models_dir: Path | None = None) -> LocalModel | None:
    """The model whose key, relative path or absolute path equals ``query`` (any case)."""
    q = query.strip()
    if not q or "\0" in q:  # no path holds a NUL (and expanduser would raise on one)
        return None
    ql = q.lower()
    abs_q = os.path.normcase(os.path.abspath(os.path.expanduser(q)))
    for m in list_models(models_dir):
        if ql in (m.model_key.lower(), m.path.lower()):
            return m
        if os.path.normcase(str(m.abs_path)) == abs_q:
            return m
    return None


def remove_model(model: LocalModel, models_dir: Path | None = None) -> None:
    """Delete ``model``'s file (a link made by ``lms import --symlink``: the link only), then
    its folders up to the models folder while they are empty."""
    root = Path(models_dir) if models_dir else paths.models_dir()
    model.abs_path.unlink(missing_ok=True)
    folder = model.abs_path.parent
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()  # only an empty folder goes
        except OSError:
            break
        folder = folder.parent
