"""A small, dependency-free GGUF header reader.

Only the header, the key/value section and the tensor infos are parsed; tensor data is never
read. Large arrays (tokenizer vocabularies, merges) are stepped over without building Python
objects, so a header with ~250k tokens parses in a few tens of milliseconds.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmscli.errors import InvalidModelFileError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# Sanity limits: a corrupt count must fail fast instead of looping for hours.
_MAX_KV_COUNT = 1 << 20
_MAX_TENSOR_COUNT = 1 << 24
_MAX_DIMS = 8
_MAX_STRING_BYTES = 1 << 28

# GGUF value type ids -> struct format character (scalars only).
_SCALAR_FORMATS: dict[int, str] = {
    0: "B",  # uint8
    1: "b",  # int8
    2: "H",  # uint16
    3: "h",  # int16
    4: "I",  # uint32
    5: "i",  # int32
    6: "f",  # float32
    7: "?",  # bool
    10: "Q",  # uint64
    11: "q",  # int64
    12: "d",  # float64
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9

# llama.cpp's LLAMA_FTYPE enum (llama.h); gaps are ids that were removed upstream.
LLAMA_FILE_TYPES: dict[int, str] = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    4: "Q4_1_SOME_F16",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    21: "Q2_K_S",
    22: "IQ3_XS",
    23: "IQ3_XXS",
    24: "IQ1_S",
    25: "IQ4_NL",
    26: "IQ3_S",
    27: "IQ3_M",
    28: "IQ2_S",
    29: "IQ2_M",
    30: "IQ4_XS",
    31: "IQ1_M",
    32: "BF16",
    36: "TQ1_0",
    37: "TQ2_0",
    38: "MXFP4_MOE",
}
# llama.cpp ORs this flag in when the file type was guessed from the tensors.
_FTYPE_GUESSED = 1024

# Encoder-only / embedding architectures as named by llama.cpp.
EMBEDDING_ARCHITECTURES = frozenset(
    {
        "bert",
        "nomic-bert",
        "nomic-bert-moe",
        "jina-bert-v2",
        "jina-bert-v3",
        "modern-bert",
        "neo-bert",
        "t5encoder",
    }
)
# Causal LM families that may carry a pooling_type key (for embedding use) but still chat.
_CAUSAL_ARCHITECTURES = frozenset(
    {
        "llama",
        "llama4",
        "mistral3",
        "qwen2",
        "qwen2moe",
        "qwen3",
        "qwen3moe",
        "gemma",
        "gemma2",
        "gemma3",
        "gemma3n",
        "phi2",
        "phi3",
        "gpt2",
        "gptneox",
        "falcon",
        "starcoder2",
        "olmo",
        "olmo2",
        "granite",
        "granitemoe",
        "deepseek2",
        "command-r",
        "cohere2",
        "stablelm",
        "internlm2",
        "exaone",
        "smollm3",
        "gpt-oss",
    }
)

# A trailing quantization tag in a file stem: "model.Q4_1", "model-Q4_K_M", "model-f16".
QUANT_SUFFIX_RE = re.compile(r"[.-](i?q\d\w*|f16|f32|bf16)$", re.IGNORECASE)

_JINJA_BLOCK_RE = re.compile(r"\{[{%](.*?)[%}]\}", re.DOTALL)
_STRING_LITERAL_RE = re.compile(r"'[^']*'|\"[^\"]*\"")
_TOOLS_VAR_RE = re.compile(r"(?<![\w.])tools\b")


class GGUFFormatError(InvalidModelFileError):
    """An unreadable GGUF file; ``reason`` says why without naming the file."""

    def __init__(self, message: str, reason: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.reason = reason


_REDOWNLOAD_HINT = "The file is damaged or incomplete: download the model again."


@dataclass(frozen=True)
class GGUFMetadata:
    architecture: str
    name: str | None
    size_label: str | None
    parameter_count: int | None
    file_type: int | None
    quantization: str | None
    bits_per_weight: float | None
    context_length: int | None
    embedding_length: int | None
    chat_template: str | None
    supports_tools: bool
    is_embedding: bool
    kv: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)


class _Truncated(Exception):
    """Raised internally when a read runs past the end of the file."""


class _Cursor:
    """Sequential reads over a buffer with one byte order."""

    def __init__(self, buf: mmap.mmap | bytes, endian: str) -> None:
        self.buf = buf
        self.size = len(buf)
        self.pos = 0
        self.endian = endian
        self._u64 = struct.Struct(endian + "Q")

    def scalar(self, fmt: str) -> Any:
        s = struct.calcsize(fmt)
        if self.pos + s > self.size:
            raise _Truncated
        (value,) = struct.unpack_from(self.endian + fmt, self.buf, self.pos)
        self.pos += s
        return value

    def u32(self) -> int:
        return int(self.scalar("I"))

    def u64(self) -> int:
        return int(self.scalar("Q"))

    def string(self) -> str:
        length = self.u64()
        if length > _MAX_STRING_BYTES or self.pos + length > self.size:
            raise _Truncated
        raw = self.buf[self.pos : self.pos + length]
        self.pos += length
        return bytes(raw).decode("utf-8", errors="replace")

    def skip_strings(self, count: int) -> None:
        # Hot loop for tokenizer vocabularies: only lengths are decoded.
        unpack, buf, pos, size = self._u64.unpack_from, self.buf, self.pos, self.size
        for _ in range(count):
            if pos + 8 > size:
                raise _Truncated
            pos += 8 + unpack(buf, pos)[0]
        if pos > size:
            raise _Truncated
        self.pos = pos

    def skip(self, nbytes: int) -> None:
        if self.pos + nbytes > self.size:
            raise _Truncated
        self.pos += nbytes


def _read_value(cur: _Cursor, vtype: int) -> Any:
    """Read one value; arrays are skipped and return None."""
    if vtype == _TYPE_STRING:
        return cur.string()
    if vtype == _TYPE_ARRAY:
        _skip_array(cur)
        return None
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is None:
        raise ValueError(f"unknown value type {vtype}")
    return cur.scalar(fmt)


def _skip_array(cur: _Cursor) -> None:
    item_type = cur.u32()
    count = cur.u64()
    if item_type == _TYPE_STRING:
        cur.skip_strings(count)
    elif item_type == _TYPE_ARRAY:
        for _ in range(count):
            _skip_array(cur)
    elif item_type in _SCALAR_FORMATS:
        cur.skip(count * struct.calcsize(_SCALAR_FORMATS[item_type]))
    else:
        raise ValueError(f"unknown array item type {item_type}")


def _read_kv(cur: _Cursor, count: int) -> dict[str, Any]:
    kv: dict[str, Any] = {}
    for _ in range(count):
        key = cur.string()
        value = _read_value(cur, cur.u32())
        if value is not None:
            kv[key] = value
    return kv


def _count_parameters(cur: _Cursor, count: int) -> int:
    total = 0
    for _ in range(count):
        cur.string()  # tensor name
        n_dims = cur.u32()
        if n_dims > _MAX_DIMS:
            raise ValueError(f"tensor with {n_dims} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= cur.u64()
        cur.skip(4 + 8)  # ggml type + data offset
        total += elements
    return total


def _detect_endian(buf: mmap.mmap | bytes) -> tuple[str, int]:
    # Big-endian GGUF files keep the magic bytes but swap every number after it.
    little = struct.unpack_from("<I", buf, 4)[0]
    if little in SUPPORTED_VERSIONS or little == 1:
        return "<", little
    big = struct.unpack_from(">I", buf, 4)[0]
    if big in SUPPORTED_VERSIONS or big == 1:
        return ">", big
    return "<", little


def _parse(buf: mmap.mmap | bytes, name: str, file_size: int) -> GGUFMetadata:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise GGUFFormatError(
            f"{name} is not a GGUF file",
            "bad magic bytes",
            hint="Only .gguf model files are supported.",
        )
    if len(buf) < 8:
        raise _Truncated
    endian, version = _detect_endian(buf)
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(
            f"{name} uses GGUF version {version}, which is not supported (only 2 and 3 are)",
            f"unsupported GGUF version {version}",
            hint="Download a newer conversion of this model.",
        )
    cur = _Cursor(buf, endian)
    cur.skip(8)
    n_tensors, n_kv = cur.u64(), cur.u64()
    if n_tensors > _MAX_TENSOR_COUNT or n_kv > _MAX_KV_COUNT:
        raise ValueError(f"implausible counts ({n_tensors} tensors, {n_kv} keys)")
    kv = _read_kv(cur, n_kv)
    n_params = _count_parameters(cur, n_tensors)
    return _build_metadata(kv, n_params or None, file_size, name)


def _quantization(file_type: int | None, file_name: str) -> str | None:
    if file_type is not None:
        known = LLAMA_FILE_TYPES.get(file_type & ~_FTYPE_GUESSED)
        if known:
            return known
    match = QUANT_SUFFIX_RE.search(Path(file_name).stem)
    return match.group(1).upper() if match else None


def template_uses_tools(template: str | None) -> bool:
    """Whether a Jinja chat template reads the ``tools`` variable (not just mentions it)."""
    if not template:
        return False
    for block in _JINJA_BLOCK_RE.findall(template):
        if _TOOLS_VAR_RE.search(_STRING_LITERAL_RE.sub("", block)):
            return True
    return False


def _is_embedding(arch: str, kv: dict[str, Any]) -> bool:
    if arch in EMBEDDING_ARCHITECTURES:
        return True
    if f"{arch}.pooling_type" not in kv:
        return False
    return kv.get(f"{arch}.attention.causal") is False or arch not in _CAUSAL_ARCHITECTURES


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def _opt_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _build_metadata(
    kv: dict[str, Any], n_params: int | None, file_size: int, file_name: str
) -> GGUFMetadata:
    arch = _opt_str(kv.get("general.architecture")) or "unknown"
    file_type = _opt_int(kv.get("general.file_type"))
    template = _opt_str(kv.get("tokenizer.chat_template"))
    bpw = round(file_size * 8 / n_params, 2) if n_params else None
    return GGUFMetadata(
        architecture=arch,
        name=_opt_str(kv.get("general.name")),
        size_label=_opt_str(kv.get("general.size_label")),
        parameter_count=n_params,
        file_type=file_type,
        quantization=_quantization(file_type, file_name),
        bits_per_weight=bpw,
        context_length=_opt_int(kv.get(f"{arch}.context_length")),
        embedding_length=_opt_int(kv.get(f"{arch}.embedding_length")),
        chat_template=template,
        supports_tools=template_uses_tools(template),
        is_embedding=_is_embedding(arch, kv),
        kv=kv,
    )


def read_gguf_metadata(path: str | os.PathLike[str]) -> GGUFMetadata:
    """Parse the header of a GGUF file. Raises ``InvalidModelFileError`` on any problem."""
    p = Path(path)
    name = p.name
    try:
        return _read_file(p)
    except FileNotFoundError:
        raise GGUFFormatError(
            f"Model file not found: {p}", "file not found", hint="Check the path."
        ) from None
    except IsADirectoryError:
        raise GGUFFormatError(f"{name} is a directory, not a model file", "not a file") from None
    except PermissionError:
        raise GGUFFormatError(
            f"Cannot read {name}: permission denied",
            "permission denied",
            hint="Check the file's permissions.",
        ) from None
    except (_Truncated, struct.error):
        raise GGUFFormatError(
            f"{name} is truncated or corrupt (the GGUF header ends early)",
            "truncated or corrupt header",
            hint=_REDOWNLOAD_HINT,
        ) from None
    except (ValueError, OverflowError) as exc:
        raise GGUFFormatError(
            f"{name} has a corrupt GGUF header ({exc})",
            f"corrupt header ({exc})",
            hint=_REDOWNLOAD_HINT,
        ) from None


def _read_file(p: Path) -> GGUFMetadata:
    with open(p, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise GGUFFormatError(f"{p.name} is empty", "the file is empty", hint=_REDOWNLOAD_HINT)
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(buf, p.name, size)


def format_params(count: int) -> str:
    """Human parameter count as LM Studio shows it: 135M, 1.5B, 7B."""
    for unit, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= unit:
            value = count / unit
            text = f"{value:.1f}" if value < 10 else f"{value:.0f}"
            return text.removesuffix(".0") + suffix
    return str(count)
