from __future__ import annotations

import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest

from lmscli.catalog.gguf import (
    GGUFMetadata,
    format_params,
    read_gguf_metadata,
    template_uses_tools,
)
from lmscli.errors import InvalidModelFileError
from tests.gguf_factory import TOOLS_TEMPLATE, make_gguf

Q4_K_M = int(gguf.LlamaFileType.MOSTLY_Q4_K_M)


def _header(version: int = 3, n_tensors: int = 0, n_kv: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv)


def _expect_invalid(path: Path) -> InvalidModelFileError:
    with pytest.raises(InvalidModelFileError) as info:
        read_gguf_metadata(path)
    message = info.value.message
    assert path.name in message
    assert "\n" not in message and "Traceback" not in message
    return info.value


def test_reads_every_field(tmp_path: Path) -> None:
    path = make_gguf(
        tmp_path / "tiny-Q4_K_M.gguf",
        name="Tiny Chat",
        size_label="4K",
        context_length=4096,
        embedding_length=128,
        n_params=4096,
        file_type=Q4_K_M,
        bos_token_id=7,
        eos_token_id=9,
    )
    meta = read_gguf_metadata(path)
    assert meta.architecture == "llama"
    assert meta.name == "Tiny Chat"
    assert meta.size_label == "4K"
    assert meta.parameter_count == 4096
    assert meta.file_type == Q4_K_M
    assert meta.quantization == "Q4_K_M"
    assert meta.bits_per_weight == round(path.stat().st_size * 8 / 4096, 2)
    assert meta.context_length == 4096
    assert meta.embedding_length == 128
    assert meta.chat_template is not None and "<|im_start|>" in meta.chat_template
    assert meta.supports_tools is False
    assert meta.is_embedding is False


def test_kv_holds_scalars_only(tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(100)]
    meta = read_gguf_metadata(make_gguf(tmp_path / "m.gguf", tokens=tokens, merges=["a b"]))
    assert meta.kv["tokenizer.ggml.bos_token_id"] == 1
    assert meta.kv["tokenizer.ggml.eos_token_id"] == 2
    assert meta.kv["general.architecture"] == "llama"
    assert meta.kv["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert meta.kv["tokenizer.ggml.add_bos_token"] is False
    assert "tokenizer.ggml.tokens" not in meta.kv
    assert "tokenizer.ggml.merges" not in meta.kv


def test_kv_is_not_part_of_equality_or_repr(tmp_path: Path) -> None:
    meta = read_gguf_metadata(make_gguf(tmp_path / "m.gguf"))
    other = GGUFMetadata(**{**meta.__dict__, "kv": {}})
    assert meta == other
    assert hash(meta) == hash(other)
    assert "kv=" not in repr(meta)
    with pytest.raises(AttributeError):
        meta.name = "changed"  # type: ignore[misc]


def test_gemma_architecture_keys(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "g.gguf", arch="gemma3", context_length=32768, embedding_length=640)
    meta = read_gguf_metadata(path)
    assert (meta.architecture, meta.context_length, meta.embedding_length) == ("gemma3", 32768, 640)


def test_optional_fields_missing(tmp_path: Path) -> None:
    path = make_gguf(
        tmp_path / "bare.gguf",
        name=None,
        context_length=None,
        embedding_length=None,
        chat_template=None,
        file_type=None,
    )
    meta = read_gguf_metadata(path)
    assert meta.name is None
    assert meta.size_label is None
    assert meta.context_length is None
    assert meta.embedding_length is None
    assert meta.chat_template is None
    assert meta.file_type is None
    assert meta.quantization is None
    assert meta.supports_tools is False


@pytest.mark.parametrize(
    ("file_name", "file_type", "expected"),
    [
        ("m.gguf", 3, "Q4_1"),
        ("m.gguf", 1, "F16"),
        ("m.gguf", 32, "BF16"),
        ("m.gguf", 1024 | 15, "Q4_K_M"),  # llama.cpp's "guessed" flag
        ("model.Q5_K_S.gguf", None, "Q5_K_S"),
        ("model-iq2_xs.gguf", None, "IQ2_XS"),
        ("model-f16.gguf", 999, "F16"),
        ("model.gguf", 999, None),
    ],
)
def test_quantization_name(
    tmp_path: Path, file_name: str, file_type: int | None, expected: str | None
) -> None:
    meta = read_gguf_metadata(make_gguf(tmp_path / file_name, file_type=file_type))
    assert meta.quantization == expected


def test_tools_template_detected(tmp_path: Path) -> None:
    meta = read_gguf_metadata(make_gguf(tmp_path / "t.gguf", chat_template=TOOLS_TEMPLATE))
    assert meta.supports_tools is True


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{% if tools %}x{% endif %}", True),
        ("{{ tools | tojson }}", True),
        ("{%- for tool in tools -%}{{ tool }}{%- endfor %}", True),
        ("You can use tools to help.{{ messages[0]['content'] }}", False),
        ("{{ 'I have no tools' }}", False),
        ("{{ message.tools }}", False),
        ("{{ tools_used }}", False),
        ("", False),
    ],
)
def test_template_uses_tools(template: str, expected: bool) -> None:
    assert template_uses_tools(template) is expected


@pytest.mark.parametrize("arch", ["bert", "nomic-bert", "jina-bert-v2", "nomic-bert-moe"])
def test_embedding_architectures(tmp_path: Path, arch: str) -> None:
    meta = read_gguf_metadata(make_gguf(tmp_path / "e.gguf", arch=arch, chat_template=None))
    assert meta.is_embedding is True
    assert meta.architecture == arch


def _pooling(arch: str, causal: bool | None = None) -> Callable[[gguf.GGUFWriter], None]:
    def extra(writer: gguf.GGUFWriter) -> None:
        writer.add_uint32(f"{arch}.pooling_type", 1)
        if causal is not None:
            writer.add_bool(f"{arch}.attention.causal", causal)

    return extra


def test_pooling_type_marks_unknown_architectures_as_embedding(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "e.gguf", arch="mystery-enc", extra=_pooling("mystery-enc"))
    assert read_gguf_metadata(path).is_embedding is True


def test_pooling_type_on_a_causal_lm_stays_llm(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "l.gguf", arch="qwen3", extra=_pooling("qwen3"))
    assert read_gguf_metadata(path).is_embedding is False
    non_causal = make_gguf(tmp_path / "n.gguf", arch="qwen3", extra=_pooling("qwen3", False))
    assert read_gguf_metadata(non_causal).is_embedding is True


def test_large_parameter_count_without_weights(tmp_path: Path) -> None:
    meta = read_gguf_metadata(make_gguf(tmp_path / "big.gguf", n_params=134_515_008))
    assert meta.parameter_count == 134_515_008
    assert format_params(meta.parameter_count) == "135M"


def test_big_endian_file(tmp_path: Path) -> None:
    path = make_gguf(tmp_path / "be.gguf", big_endian=True, context_length=1234, file_type=3)
    meta = read_gguf_metadata(path)
    assert (meta.context_length, meta.quantization, meta.parameter_count) == (1234, "Q4_1", 4096)


def test_skips_big_tokenizer_arrays_fast(tmp_path: Path) -> None:
    tokens = [f"token-{i:06d}" for i in range(50_000)]
    merges = [f"t{i} m{i}" for i in range(50_000)]
    path = make_gguf(tmp_path / "vocab.gguf", tokens=tokens, merges=merges)
    start = time.perf_counter()
    meta = read_gguf_metadata(path)
    elapsed = time.perf_counter() - start
    assert meta.parameter_count == 4096
    assert meta.kv["tokenizer.ggml.eos_token_id"] == 2
    assert elapsed < 0.3


@pytest.mark.parametrize(
    ("count", "expected"),
    [
        (134_515_008, "135M"),
        (268_098_176, "268M"),
        (270_000_000, "270M"),
        (7_000_000_000, "7B"),
        (7_241_732_096, "7.2B"),
        (1_500_000_000, "1.5B"),
        (1_543_714_304, "1.5B"),
        (70_553_706_496, "71B"),
        (5_500_000, "5.5M"),
        (4096, "4.1K"),
        (512, "512"),
    ],
)
def test_format_params(count: int, expected: str) -> None:
    assert format_params(count) == expected


# --- broken files ---------------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    err = _expect_invalid(tmp_path / "nope.gguf")
    assert "not found" in err.message


def test_directory(tmp_path: Path) -> None:
    (tmp_path / "dir.gguf").mkdir()
    _expect_invalid(tmp_path / "dir.gguf")


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "empty.gguf").write_bytes(b"")
    err = _expect_invalid(tmp_path / "empty.gguf")
    assert "empty" in err.message


def test_wrong_magic(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}" + b"\0" * 100)
    err = _expect_invalid(path)
    assert err.message == "model.safetensors is not a GGUF file"


@pytest.mark.parametrize("version", [1, 4, 0xDEAD])
def test_unsupported_version(tmp_path: Path, version: int) -> None:
    path = tmp_path / "old.gguf"
    path.write_bytes(_header(version=version))
    err = _expect_invalid(path)
    assert "version" in err.message


def test_truncated_at_every_length(tmp_path: Path) -> None:
    # Header-only file (no tensor data): every proper prefix cuts into the header.
    full = make_gguf(tmp_path / "full.gguf", n_params=2_000_000).read_bytes()
    for length in range(1, len(full), 7):
        cut = tmp_path / "cut.gguf"
        cut.write_bytes(full[:length])
        _expect_invalid(cut)


def test_huge_string_length_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.gguf"
    path.write_bytes(_header(n_kv=1) + struct.pack("<Q", 2**40) + b"abc")
    err = _expect_invalid(path)
    assert "corrupt" in err.message


def test_unknown_value_type_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.gguf"
    key = b"general.name"
    path.write_bytes(_header(n_kv=1) + struct.pack("<Q", len(key)) + key + struct.pack("<I", 99))
    err = _expect_invalid(path)
    assert "corrupt" in err.message


def test_implausible_counts_fail_fast(tmp_path: Path) -> None:
    path = tmp_path / "counts.gguf"
    path.write_bytes(_header(n_tensors=2**62, n_kv=2**62))
    _expect_invalid(path)


def test_package_import_is_cheap() -> None:
    code = (
        "import sys, lmscli.catalog\n"
        "bad = [m for m in ('gguf', 'huggingface_hub', 'numpy') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[2])
