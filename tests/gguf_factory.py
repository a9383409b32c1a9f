"""Small synthetic GGUF files for tests, written with the reference ``gguf`` writer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import gguf
import numpy as np

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS_TEMPLATE = (
    "{% if tools %}{{ '<tools>' }}{% for t in tools %}{{ t | tojson }}{% endfor %}"
    "{{ '</tools>' }}{% endif %}" + CHATML_TEMPLATE
)

# Above this many parameters no tensor data is written (the reader never looks at it).
_MAX_REAL_PARAMS = 1 << 20


def _tensor_shapes(n_params: int) -> list[tuple[str, tuple[int, ...]]]:
    """Three tensors, two of them multi-dimensional, whose sizes add up to ``n_params``."""
    if n_params < 16:
        raise ValueError("n_params must be at least 16")
    k = n_params // 8
    rest = n_params - 4 * k - 2 * k
    return [
        ("token_embd.weight", (4, k)),
        ("blk.0.attn_q.weight", (2, k)),
        ("output_norm.weight", (rest,)),
    ]


def make_gguf(
    path: str | Path,
    *,
    arch: str = "llama",
    name: str | None = "Test Model",
    size_label: str | None = None,
    context_length: int | None = 2048,
    embedding_length: int | None = 64,
    chat_template: str | None = CHATML_TEMPLATE,
    n_params: int = 4096,
    file_type: int | None = int(gguf.LlamaFileType.ALL_F32),
    tokens: Sequence[str] | None = None,
    merges: Sequence[str] | None = None,
    bos_token_id: int | None = 1,
    eos_token_id: int | None = 2,
    big_endian: bool = False,
    extra: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write a small valid GGUF file and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    endian = gguf.GGUFEndian.BIG if big_endian else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(path, arch, endianess=endian)
    _add_metadata(writer, arch, name, size_label, context_length, embedding_length, file_type)
    _add_tokenizer(writer, chat_template, tokens, merges, bos_token_id, eos_token_id)
    if extra is not None:
        extra(writer)
    header_only = n_params > _MAX_REAL_PARAMS
    for tname, shape in _tensor_shapes(n_params):
        if header_only:
            count = int(np.prod(shape))
            writer.add_tensor_info(tname, shape, np.dtype(np.float32), count * 4)
        else:
            writer.add_tensor(tname, np.zeros(shape, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    if header_only:
        writer.write_ti_data_to_file()
    else:
        writer.write_tensors_to_file()
    writer.close()
    return path


def _add_metadata(
    writer: gguf.GGUFWriter,
    arch: str,
    name: str | None,
    size_label: str | None,
    context_length: int | None,
    embedding_length: int | None,
    file_type: int | None,
) -> None:
    if name is not None:
        writer.add_name(name)
    if size_label is not None:
        writer.add_size_label(size_label)
    if context_length is not None:
        writer.add_uint32(f"{arch}.context_length", context_length)
    if embedding_length is not None:
        writer.add_uint32(f"{arch}.embedding_length", embedding_length)
    if file_type is not None:
        writer.add_file_type(file_type)
    writer.add_float32(f"{arch}.rope.freq_base", 10000.0)
    writer.add_bool("tokenizer.ggml.add_bos_token", False)


def _add_tokenizer(
    writer: gguf.GGUFWriter,
    chat_template: str | None,
    tokens: Sequence[str] | None,
    merges: Sequence[str] | None,
    bos_token_id: int | None,
    eos_token_id: int | None,
) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(list(tokens) if tokens is not None else ["<unk>", "<s>", "</s>", "a"])
    if merges is not None:
        writer.add_token_merges(list(merges))
    if bos_token_id is not None:
        writer.add_bos_token_id(bos_token_id)
    if eos_token_id is not None:
        writer.add_eos_token_id(eos_token_id)
    if chat_template is not None:
        writer.add_chat_template(chat_template)
