"""The llama.cpp engine, on llama-cpp-python's low-level bindings (``llama_cpp.llama_cpp``).

One model, one context whose unified KV pool holds ``parallel`` sequences, one sampler chain
per sequence: ``LlamaBackend``, the ``backend.Backend`` the scheduler (``ModelInstance``) runs
on. Imported only by the server process: it loads the native library.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import threading
from typing import Any

import llama_cpp
from llama_cpp import llama_cpp as ll

from lmscli.engine.backend import (
    Backend,
    DraftModelError,
    GrammarError,
    ModelSpec,
    PredictionFailure,
    ProgressFn,
)
from lmscli.engine.base import Engine
from lmscli.engine.drafting import CPU_COST, GPU_COST, StepCost
from lmscli.engine.promptcache import State
from lmscli.engine.slots import Batch, common_prefix
from lmscli.engine.types import DraftModel, LoadOptions, PredictionRequest
from lmscli.errors import InvalidModelFileError

log = logging.getLogger("lmscli.llama")
PENALTY_LAST_N = 64  # as llama-cpp-python's Llama
EMBED_CONTEXT = 2048
STATE_FLAGS = 0  # a sequence's whole state, copied to host memory
_errors = threading.local()  # llama.cpp's error lines, per calling thread


@ll.llama_log_callback
def _on_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    # llama.cpp explains a rejected grammar or model only in its log: keep the errors so that
    # the caller can say why
    if level == 3:  # GGML_LOG_LEVEL_ERROR
        line = text.decode("utf-8", "replace").strip()
        if line:
            lines = getattr(_errors, "lines", [])
            _errors.lines = [*lines[-9:], line]
            log.debug("llama.cpp: %s", line)


ll.llama_log_set(_on_log, ctypes.c_void_p(0))
ll.llama_backend_init()


def _take_errors() -> str:
    lines = getattr(_errors, "lines", [])
    _errors.lines = []
    return "; ".join(lines)


def _gpu_layers(ratio: float | None) -> int:
    if ratio is None or ratio >= 1:
        return -1
    if ratio <= 0:
        return 0
    # Layer counts are not known before loading; llama.cpp clamps an over-large count.
    return max(1, round(ratio * 100))


class LlamaModel:
    """The weights and vocabulary, shared by the generation and the embedding context."""

    def __init__(self, path: str, options: LoadOptions, on_progress: ProgressFn | None) -> None:
        self.cancelled = False
        params = ll.llama_model_default_params()
        params.n_gpu_layers = _gpu_layers(options.gpu_ratio)

        def report(progress: float, _user_data: Any) -> bool:
            if on_progress is not None and on_progress(float(progress)) is False:
                self.cancelled = True
            return not self.cancelled

        # kept on self: llama.cpp calls it while loading, after this frame could be gone
        self._progress = ll.llama_progress_callback(report)
        params.progress_callback = self._progress
        _take_errors()
        self.ptr = ll.llama_model_load_from_file(path.encode("utf-8"), params)
        if not self.ptr:
            if self.cancelled:
                raise RuntimeError("load cancelled")
            raise InvalidModelFileError(
                f"llama.cpp could not read {os.path.basename(path)}"
                f" ({_take_errors() or 'not a model it supports'})")
        self.vocab = ll.llama_model_get_vocab(self.ptr)
        self.n_vocab = ll.llama_vocab_n_tokens(self.vocab)
        self._pieces: dict[int, bytes] = {}

    def close(self) -> None:
        if self.ptr:
            ll.llama_model_free(self.ptr)
            self.ptr = None

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        data = text.encode("utf-8", "replace")
        size = len(data) + 8
        buf = (ll.llama_token * size)()
        n = ll.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, True)
        if n < 0:
            size = -n
            buf = (ll.llama_token * size)()
            n = ll.llama_tokenize(self.vocab, data, len(data), buf, size, add_bos, True)
        if n < 0:
            raise PredictionFailure("llama.cpp could not tokenize the prompt.")
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = ll.llama_token_to_piece(self.vocab, token, buf, 64, 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = ll.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            cached = self._pieces[token] = buf.raw[:max(0, n)]
        return cached

    def text_of(self, token: int) -> str:
        if token < 0:
            return ""
        raw = ll.llama_vocab_get_text(self.vocab, token)
        return raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw or "")


def _context(model: LlamaModel, *, n_ctx: int, n_seq: int, embeddings: bool) -> Any:
    p = ll.llama_context_default_params()
    threads = os.cpu_count() or 1
    p.n_ctx = n_ctx
    p.n_batch = p.n_ubatch = LlamaBackend.n_batch if not embeddings else n_ctx
    p.n_seq_max = n_seq
    p.n_threads = p.n_threads_batch = threads
    p.kv_unified = True  # one pool: any sequence may use the whole context
    p.swa_full = True  # sliding-window models keep every position, so prefixes stay reusable
    p.embeddings = embeddings
    if embeddings:
        p.pooling_type = ll.LLAMA_POOLING_TYPE_MEAN
    _take_errors()
    ctx = ll.llama_init_from_model(model.ptr, p)
    if not ctx:
        raise InvalidModelFileError(
            f"llama.cpp could not create a context of {n_ctx} tokens"
            f" ({_take_errors() or 'not enough memory?'})")
    return ctx


def _decode(ctx: Any, b: Any, batch: Batch) -> int:
    """Decode ``batch`` in ``ctx`` through the llama_batch ``b``; llama_decode's status."""
    for i, (tok, pos, seq, keep) in enumerate(zip(batch.tokens, batch.positions,
                                                  batch.seq_ids, batch.logits, strict=True)):
        b.token[i] = tok
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = keep
    b.n_tokens = len(batch)
    return int(ll.llama_decode(ctx, b))


def _vocabulary_clash(draft: LlamaModel, main: LlamaModel) -> str | None:
    """Why ``draft``'s guesses would be other tokens than ``main`` reads, if they would."""
    if draft.n_vocab != main.n_vocab:
        return f"it has {draft.n_vocab} tokens, the model {main.n_vocab}"
    for token in range(main.n_vocab):
        if draft.text_of(token) != main.text_of(token):
            return (f"token {token} is {draft.text_of(token)!r} in it and "
                    f"{main.text_of(token)!r} in the model")
    return None


class DraftContext:
    """A draft model beside the main one: its weights, and a context whose sequence for each
    slot holds what that slot holds, so that it guesses on from where the slot is."""

    def __init__(self, draft: DraftModel, main: LlamaModel, options: LoadOptions,
                 n_ctx: int, n_seq: int) -> None:
        try:
            self.model = LlamaModel(draft.path, options, None)
        except InvalidModelFileError as exc:
            raise DraftModelError(f"Draft model {draft.model_key}: {exc}") from exc
        self.ctx: Any = None
        self._batch: Any = None
        try:
            if (clash := _vocabulary_clash(self.model, main)) is not None:
                raise DraftModelError(f"{draft.model_key} cannot draft for this model: "
                                      f"{clash}. Choose a draft model of the same family.")
            self.ctx = _context(self.model, n_ctx=n_ctx, n_seq=n_seq, embeddings=False)
        except BaseException:
            self.close()
            raise
        self.memory = ll.llama_get_memory(self.ctx)
        self._batch = ll.llama_batch_init(LlamaBackend.n_batch, 0, 1)
        self.held: list[list[int]] = [[] for _ in range(n_seq)]
        self._greedy = ll.llama_sampler_init_greedy()

    def close(self) -> None:
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            ll.llama_sampler_free(self._greedy)
            self._batch = None
        if self.ctx:
            ll.llama_free(self.ctx)
            self.ctx = None
        self.model.close()

    def guess(self, wants: list[tuple[int, list[int], int]]) -> list[list[int]]:
        """Catch each sequence up with its tokens, then guess greedily, all in step."""
        for seq, tokens, _ in wants:
            self._catch_up(seq, tokens[:-1])
        drafts: dict[int, list[int]] = {seq: [] for seq, _, _ in wants}
        going = {seq: most for seq, _, most in wants if most > 0}
        rows = [(seq, tokens[-1]) for seq, tokens, most in wants if most > 0]
        while rows:
            batch = Batch()  # decoded together, each with its logits
            for seq, token in rows:
                batch.add(token, len(self.held[seq]), seq, True)
                self.held[seq].append(token)
            self._run(batch)
            decoded, rows = rows, []
            for i, (seq, _) in enumerate(decoded):
                token = int(ll.llama_sampler_sample(self._greedy, self.ctx, i))
                drafts[seq].append(token)
                if len(drafts[seq]) < going[seq] and \
                        not ll.llama_vocab_is_eog(self.model.vocab, token):
                    rows.append((seq, token))
        return [drafts[seq] for seq, _, _ in wants]

    def _catch_up(self, seq: int, tokens: list[int]) -> None:
        """Make the sequence hold ``tokens``: drop what differs, decode what is missing."""
        held = self.held[seq]
        same = common_prefix(held, tokens)
        if same < len(held):
            ll.llama_memory_seq_rm(self.memory, seq, same, -1)
            del held[same:]
        for start in range(same, len(tokens), LlamaBackend.n_batch):
            batch = Batch()
            for pos in range(start, min(start + LlamaBackend.n_batch, len(tokens))):
                batch.add(tokens[pos], pos, seq, False)
            self._run(batch)
            held.extend(batch.tokens)

    def _run(self, batch: Batch) -> None:
        if _decode(self.ctx, self._batch, batch) != 0:
            raise PredictionFailure("The draft model could not decode (its context is full?).")


class LlamaBackend(Backend):
    name = "llama.cpp"
    version = llama_cpp.__version__

    def __init__(self, spec: ModelSpec, options: LoadOptions) -> None:
        super().__init__(spec, options)
        self.context_length = 0
        self.model: LlamaModel | None = None
        self.ctx: Any = None
        self.memory: Any = None
        self._batch: Any = None
        self._embed_ctx: Any = None
        self._draft_ctx: DraftContext | None = None

    # -- loading ---------------------------------------------------------------------------

    def load(self, context_length: int, n_seq: int, on_progress: ProgressFn | None) -> int:
        if on_progress:
            on_progress(0.0)
        try:
            self.model = LlamaModel(self.spec.path, self.options, on_progress)
        except InvalidModelFileError as exc:
            raise InvalidModelFileError(f"Failed to load {self.spec.model_key}: {exc}") from exc
        self.ctx = _context(self.model, n_ctx=context_length, n_seq=n_seq,
                            embeddings=self.spec.is_embedding)
        self.context_length = ll.llama_n_ctx(self.ctx)
        self.memory = ll.llama_get_memory(self.ctx)
        self._batch = ll.llama_batch_init(self.n_batch, 0, 1)
        on_gpu = ll.llama_supports_gpu_offload() and self.options.gpu_ratio != 0
        self.step_cost = StepCost(GPU_COST if on_gpu else CPU_COST)
        if on_progress:
            on_progress(1.0)
        return self.context_length

    def attach_draft(self, draft: DraftModel, context_length: int, n_seq: int) -> None:
        assert self.model is not None
        if self.spec.is_embedding:
            raise DraftModelError("An embedding model does not draft.")
        attached = DraftContext(draft, self.model, self.options, context_length, n_seq)
        if self._draft_ctx is not None:
            self._draft_ctx.close()
        self._draft_ctx = attached

    def draft_tokens(self, wants: list[tuple[int, list[int], int]]) -> list[list[int]]:
        assert self._draft_ctx is not None
        return self._draft_ctx.guess(wants)

    def unload(self) -> None:
        if self._draft_ctx is not None:
            self._draft_ctx.close()
            self._draft_ctx = None
        if self._batch is not None:
            ll.llama_batch_free(self._batch)
            self._batch = None
        for ctx in (self._embed_ctx, self.ctx):
            if ctx:
                ll.llama_free(ctx)
        self._embed_ctx = self.ctx = None
        if self.model is not None:
            self.model.close()

    # -- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        assert self.model is not None
        return self.model.tokenize(text, add_bos)

    def wants_bos(self, prompt: str) -> bool:
        assert self.model is not None
        bos = self.bos_token
        return ll.llama_vocab_get_add_bos(self.model.vocab) and not (bos and
                                                                      prompt.startswith(bos))

    @property
    def bos_token(self) -> str:
        return self.model.text_of(ll.llama_vocab_bos(self.model.vocab)) if self.model else ""

    @property
    def eos_token(self) -> str:
        return self.model.text_of(ll.llama_vocab_eos(self.model.vocab)) if self.model else ""

    def piece(self, token: int) -> bytes:
        assert self.model is not None
        return self.model.piece(token)

    def is_eog(self, token: int) -> bool:
        assert self.model is not None
        return bool(ll.llama_vocab_is_eog(self.model.vocab, token))

    # -- sampling --------------------------------------------------------------------------

    def check_grammar(self, grammar: str) -> str | None:
        """Parse the grammar as sampling would; uses only the vocabulary, so any thread."""
        if self.model is None:
            return None
        _take_errors()
        sampler = ll.llama_sampler_init_grammar(self.model.vocab, grammar.encode("utf-8"),
                                                b"root")
        if not sampler:
            return _take_errors() or "llama.cpp could not parse the grammar"
        ll.llama_sampler_free(sampler)
        return None

    def new_sampler(self, request: PredictionRequest) -> Any:
        assert self.model is not None
        p = request.params
        chain = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
        add = ll.llama_sampler_chain_add
        add(chain, ll.llama_sampler_init_penalties(self.model.n_vocab, PENALTY_LAST_N,
                                                   p.repeat_penalty, p.frequency_penalty,
                                                   p.presence_penalty))
        if request.grammar:
            _take_errors()
            grammar = ll.llama_sampler_init_grammar(
                self.model.vocab, request.grammar.encode("utf-8"), b"root")
            if not grammar:
                ll.llama_sampler_free(chain)
                raise GrammarError(_take_errors() or "llama.cpp could not parse the grammar")
            add(chain, grammar)
        if p.temperature == 0:
            add(chain, ll.llama_sampler_init_greedy())
            return chain
        add(chain, ll.llama_sampler_init_top_k(p.top_k))
        add(chain, ll.llama_sampler_init_top_p(p.top_p, 1))
        add(chain, ll.llama_sampler_init_min_p(p.min_p, 1))
        add(chain, ll.llama_sampler_init_temp(p.temperature))
        seed = p.seed if p.seed is not None else ll.LLAMA_DEFAULT_SEED
        add(chain, ll.llama_sampler_init_dist(seed & 0xFFFFFFFF))
        return chain

    def free_sampler(self, sampler: Any) -> None:
        ll.llama_sampler_free(sampler)

    def sample(self, sampler: Any, index: int) -> int:
        return int(ll.llama_sampler_sample(sampler, self.ctx, index))

    # -- decoding --------------------------------------------------------------------------

    def decode(self, batch: Batch) -> int:
        return _decode(self.ctx, self._batch, batch)

    def seq_rm(self, seq_id: int, start: int) -> bool:
        return bool(ll.llama_memory_seq_rm(self.memory, seq_id, start, -1))

    def seq_cp(self, src: int, dst: int, count: int) -> None:
        ll.llama_memory_seq_cp(self.memory, src, dst, 0, count)

    def save_state(self, seq_id: int) -> State | None:
        size = ll.llama_state_seq_get_size_ext(self.ctx, seq_id, STATE_FLAGS)
        if not size:
            return None
        # a bytearray, written in place: its pages are touched once, and it is kept as it is
        state = bytearray(size)
        view = (ctypes.c_uint8 * size).from_buffer(state)
        n = ll.llama_state_seq_get_data_ext(self.ctx, view, size, seq_id, STATE_FLAGS)
        del view
        if not n:
            return None
        del state[n:]
        return state

    def restore_state(self, seq_id: int, data: State) -> bool:
        if isinstance(data, bytearray):
            src: Any = (ctypes.c_uint8 * len(data)).from_buffer(data)
        else:  # the bytes object's own buffer: llama.cpp only reads it
            src = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_uint8))
        return ll.llama_state_seq_set_data_ext(self.ctx, src, len(data), seq_id,
                                               STATE_FLAGS) > 0

    # -- embeddings ------------------------------------------------------------------------

    def embed_texts(self, texts: list[str], first: int = 0) -> list[list[float]]:
        assert self.model is not None
        if self.spec.is_embedding:
            ctx = self.ctx
        else:
            # a chat model embeds through a second, pooled context on the same weights
            if self._embed_ctx is None:
                self._embed_ctx = _context(self.model, n_ctx=min(self.context_length,
                                                                 EMBED_CONTEXT),
                                           n_seq=1, embeddings=True)
            ctx = self._embed_ctx
        return [self._embed_one(ctx, text, first + i) for i, text in enumerate(texts)]

    def _embed_one(self, ctx: Any, text: str, index: int) -> list[float]:
        assert self.model is not None
        tokens = self.model.tokenize(text, ll.llama_vocab_get_add_bos(self.model.vocab))
        n_ctx = ll.llama_n_ctx(ctx)
        if not tokens:
            raise ValueError(f"Input {index} is empty.")
        if len(tokens) > n_ctx:
            raise ValueError(f"Input {index} is {len(tokens)} tokens long, more than the "
                             f"embedding context of {n_ctx} tokens.")
        ll.llama_memory_clear(ll.llama_get_memory(ctx), True)
        batch = ll.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, tok in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = True
            batch.n_tokens = len(tokens)
            if ll.llama_decode(ctx, batch) != 0:
                raise PredictionFailure("llama.cpp could not compute the embedding.")
        finally:
            ll.llama_batch_free(batch)
        n_embd = ll.llama_model_n_embd(self.model.ptr)
        vector = ll.llama_get_embeddings_seq(ctx, 0)
        values = [float(vector[i]) for i in range(n_embd)]
        norm = math.sqrt(sum(v * v for v in values)) or 1.0
        return [v / norm for v in values]


class LlamaEngine(Engine):
    name = "llama.cpp"
    version = llama_cpp.__version__

    def backend(self, spec: ModelSpec, options: LoadOptions) -> Backend:
        return LlamaBackend(spec, options)
