"""The llama.cpp engine, through llama-cpp-python.

Imported only by the server process: it loads the native library.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from typing import Any

import llama_cpp

from lmscli.engine.base import Engine, ModelInstance, ModelSpec, Prediction, ProgressFn
from lmscli.engine.textstream import StopMatcher, Utf8Stream
from lmscli.engine.types import (
    Done,
    Fragment,
    LoadOptions,
    PredictionStats,
    PromptProgress,
    StopReason,
)
from lmscli.errors import InvalidModelFileError

# Prompt chunks small enough that progress moves on long prompts, large enough to stay fast.
PROMPT_CHUNK = 256
_load_lock = threading.Lock()


@contextmanager
def _load_progress(callback: ProgressFn | None):
    """Llama() builds its model params internally; this puts our progress callback in them."""
    if callback is None:
        yield
        return
    low = llama_cpp.llama_cpp  # the module Llama() calls, not the package
    original = low.llama_model_default_params

    def report(progress: float, _user_data: Any) -> bool:
        return callback(float(progress)) is not False

    c_callback = llama_cpp.llama_progress_callback(report)

    def params_with_progress() -> Any:
        params = original()
        params.progress_callback = c_callback
        return params

    with _load_lock:
        low.llama_model_default_params = params_with_progress
        try:
            yield
        finally:
            low.llama_model_default_params = original


def _gpu_layers(ratio: float | None) -> int:
    if ratio is None or ratio >= 1:
        return -1
    if ratio <= 0:
        return 0
    # Layer counts are not known before loading; llama.cpp clamps an over-large count.
    return max(1, round(ratio * 100))


class LlamaInstance(ModelInstance):
    engine_name = "llama.cpp"

    def __init__(self, spec: ModelSpec, options: LoadOptions) -> None:
        super().__init__(spec, options)
        self.llama: llama_cpp.Llama | None = None
        self._embedder: llama_cpp.Llama | None = None

    # -- loading ---------------------------------------------------------------------------

    def _load(self, on_progress: ProgressFn | None) -> None:
        if on_progress:
            on_progress(0.0)
        n_ctx = self.context_length
        try:
            with _load_progress(on_progress):
                self.llama = llama_cpp.Llama(
                    model_path=self.spec.path,
                    n_ctx=n_ctx,
                    n_batch=512,
                    n_gpu_layers=_gpu_layers(self.options.gpu_ratio),
                    seed=self.options.seed if self.options.seed is not None else -1,
                    embedding=self.spec.is_embedding,
                    n_threads=os.cpu_count() or 1,
                    verbose=False,
                )
        except (ValueError, RuntimeError, OSError) as exc:
            raise InvalidModelFileError(
                f"Failed to load {self.spec.model_key}: llama.cpp could not read "
                f"{os.path.basename(self.spec.path)} ({exc})"
            ) from exc
        self.context_length = self.llama.n_ctx()
        if on_progress:
            on_progress(1.0)

    def _unload(self) -> None:
        for model in (self.llama, self._embedder):
            if model is not None:
                model.close()
        self.llama = self._embedder = None

    # -- tokens ----------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return self.call(lambda: self._tokenize(text, add_bos))

    def _tokenize(self, text: str, add_bos: bool) -> list[int]:
        assert self.llama is not None
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def _wants_bos(self, prompt: str) -> bool:
        assert self.llama is not None
        bos = self.bos_token
        return self.llama._model.add_bos_token() and not (bos and prompt.startswith(bos))

    @property
    def bos_token(self) -> str:
        return self._token_text(self.llama.token_bos() if self.llama else -1)

    @property
    def eos_token(self) -> str:
        return self._token_text(self.llama.token_eos() if self.llama else -1)

    def _token_text(self, token: int) -> str:
        if self.llama is None or token < 0:
            return ""
        piece = self.llama._model.token_get_text(token)
        return piece if isinstance(piece, str) else piece.decode("utf-8", "replace")

    # -- prediction ------------------------------------------------------------------------

    def _predict(self, prediction: Prediction) -> None:
        assert self.llama is not None
        req = prediction.request
        started = time.perf_counter()
        add_bos = req.add_bos if req.add_bos is not None else self._wants_bos(req.prompt)
        tokens = self._tokenize(req.prompt, add_bos)
        if len(tokens) >= self.context_length:
            prediction.emit(Done(PredictionStats(
                stop_reason="contextLengthReached", prompt_tokens=len(tokens),
                total_time_s=time.perf_counter() - started)))
            return
        self.status = "processingPrompt"
        cached = self._process_prompt(tokens, prediction)
        if prediction.cancelled:
            prediction.emit(Done(PredictionStats(
                stop_reason="userStopped", prompt_tokens=len(tokens), cached_tokens=cached,
                total_time_s=time.perf_counter() - started)))
            return
        self.status = "generating"
        self._generate(tokens, cached, started, prediction)

    def _process_prompt(self, tokens: list[int], prediction: Prediction) -> int:
        """Evaluate the prompt in chunks, reusing the cached prefix; returns the cached count.

        The last prompt token is always evaluated so that its logits are fresh; then
        ``Llama.generate`` finds the whole prompt in its cache and samples at once.
        """
        llama = self.llama
        assert llama is not None
        cached = 0
        for a, b in zip(llama._input_ids.tolist(), tokens[:-1], strict=False):
            if a != b:
                break
            cached += 1
        if cached < llama.n_tokens:
            llama._ctx.kv_cache_seq_rm(-1, cached, -1)
            llama.n_tokens = cached
        todo = tokens[cached:]
        total = len(tokens)
        prediction.emit(PromptProgress(0.0, cached, cached, total))
        for start in range(0, len(todo), PROMPT_CHUNK):
            if prediction.cancelled:
                return cached
            llama.eval(todo[start:start + PROMPT_CHUNK])
            done = cached + min(start + PROMPT_CHUNK, len(todo))
            if done < total:
                prediction.emit(PromptProgress(done / total, cached, done, total))
        return cached

    def _generate(self, tokens: list[int], cached: int, started: float,
                  prediction: Prediction) -> None:
        llama = self.llama
        assert llama is not None
        p = prediction.request.params
        if p.seed is not None:
            llama.set_seed(p.seed)
        grammar = (llama_cpp.LlamaGrammar.from_string(prediction.request.grammar, verbose=False)
                   if prediction.request.grammar else None)
        stops, utf8 = StopMatcher(p.stop), Utf8Stream()
        vocab = llama._model.vocab
        limit = p.max_tokens if p.max_tokens is not None and p.max_tokens >= 0 else None
        first_at: float | None = None
        predicted = 0
        reason: StopReason = "eosFound"
        stop_string: str | None = None
        prompt_done = False
        for token in llama.generate(
            tokens, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p, temp=p.temperature,
            repeat_penalty=p.repeat_penalty, grammar=grammar,
        ):
            if not prompt_done:
                prediction.emit(PromptProgress(1.0, cached, len(tokens), len(tokens)))
                prompt_done = True
            if prediction.cancelled:
                reason = "userStopped"
                break
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                reason = "eosFound"
                break
            predicted += 1
            if first_at is None:
                first_at = time.perf_counter()
            text, stop_string = stops.feed(utf8.feed(llama.detokenize([token])))
            if text:
                prediction.emit(Fragment(text, 1))
            if stop_string is not None:
                reason = "stopStringFound"
                break
            if limit is not None and predicted >= limit:
                reason = "maxPredictedTokensReached"
                break
            if llama.n_tokens + 1 >= self.context_length:
                reason = "contextLengthReached"
                break
        if stop_string is None:
            tail = stops.feed(utf8.flush())[0] + stops.flush()
            if tail:
                prediction.emit(Fragment(tail, 0))
        prediction.emit(Done(self._stats(reason, tokens, cached, predicted, started, first_at,
                                         stop_string)))

    @staticmethod
    def _stats(reason: StopReason, tokens: list[int], cached: int, predicted: int,
               started: float, first_at: float | None, stop_string: str | None
               ) -> PredictionStats:
        ended = time.perf_counter()
        decode_time = ended - first_at if first_at is not None else 0.0
        tps = (predicted - 1) / decode_time if predicted > 1 and decode_time > 0 else None
        return PredictionStats(
            stop_reason=reason, prompt_tokens=len(tokens), cached_tokens=cached,
            predicted_tokens=predicted,
            time_to_first_token_s=(first_at - started) if first_at is not None else None,
            tokens_per_second=tps, total_time_s=ended - started, stop_string=stop_string,
        )

    # -- embeddings ------------------------------------------------------------------------

    def embed(self, texts: list[str]) -> list[list[float]]:
        self.status = "computingEmbedding"
        try:
            return self.call(lambda: self._embed(texts))
        finally:
            self.status = "idle"

    def _embed(self, texts: list[str]) -> list[list[float]]:
        if self.spec.is_embedding:
            assert self.llama is not None
            model = self.llama
        else:
            # A chat model embeds through a second, pooled context on the same weights file.
            if self._embedder is None:
                self._embedder = llama_cpp.Llama(
                    model_path=self.spec.path, n_ctx=min(self.context_length, 2048),
                    embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                    n_gpu_layers=_gpu_layers(self.options.gpu_ratio), verbose=False,
                )
            model = self._embedder
        return [list(map(float, model.embed(t, normalize=True))) for t in texts]


class LlamaEngine(Engine):
    name = "llama.cpp"
    version = llama_cpp.__version__

    def create(self, spec: ModelSpec, options: LoadOptions) -> ModelInstance:
        return LlamaInstance(spec, options)
