"""A deterministic engine for fast tests: no weights, same interface and events as llama.cpp.

Tokens are whitespace-separated words. The reply is ``FakeEngine.reply`` unless the prompt
asks for one with ``[[reply: text]]``; ``[[fail]]`` makes the prediction fail and
``[[slow]]`` adds a delay per token so that cancellation can be tested; ``[[count: N]]``
replies ``n1 n2 … nN``, text that the prompt itself does not contain.
"""

from __future__ import annotations

import re
import time

from lmscli.engine.base import Engine, ModelInstance, ModelSpec, Prediction, ProgressFn
from lmscli.engine.textstream import StopMatcher
from lmscli.engine.types import Done, Failed, Fragment, LoadOptions, PredictionStats, PromptProgress

DEFAULT_REPLY = "Hello! I am the fake engine."


def _last_turn(prompt: str) -> str:
    """Directives count only in the newest user turn, not in the history before it."""
    marker = "<|im_start|>user"
    return prompt[prompt.rindex(marker):] if marker in prompt else prompt


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


class FakeInstance(ModelInstance):
    engine_name = "fake"

    def __init__(self, spec: ModelSpec, options: LoadOptions, reply: str) -> None:
        super().__init__(spec, options)
        self.reply = reply
        self._cache: list[str] = []

    def _load(self, on_progress: ProgressFn | None) -> None:
        with open(self.spec.path, "rb") as f:
            if f.read(4) != b"GGUF":
                from lmscli.errors import InvalidModelFileError

                raise InvalidModelFileError(f"Failed to load {self.spec.model_key}: not GGUF")
        for step in (0.0, 0.5, 1.0):
            if on_progress and on_progress(step) is False:
                raise RuntimeError("load cancelled")

    def tokenize(self, text: str, *, add_bos: bool = False) -> list[int]:
        return [hash(w) & 0xFFFF for w in _words(text)]

    def embed(self, texts: list[str]) -> list[list[float]]:
        return [[float(len(t)), float(len(_words(t))), 1.0] for t in texts]

    def _predict(self, prediction: Prediction) -> None:
        req = prediction.request
        started = time.perf_counter()
        asked = _last_turn(req.prompt)
        if "[[fail]]" in asked:
            prediction.emit(Failed("The fake engine was asked to fail."))
            return
        tokens = _words(req.prompt)
        if len(tokens) >= self.context_length:
            prediction.emit(Done(PredictionStats("contextLengthReached", len(tokens))))
            return
        cached = self._cached_prefix(tokens)
        self.status = "processingPrompt"
        for i in range(5):
            prediction.emit(PromptProgress(i / 4, cached, cached, len(tokens)))
        self.status = "generating"
        slow = 0.05 if "[[slow]]" in asked else 0.0
        match = re.search(r"\[\[reply: (.*)\]\]", asked, re.S)  # to the last ]]
        count = re.search(r"\[\[count: (\d+)\]\]", asked)
        if count:
            reply = " ".join(f"n{i}" for i in range(1, int(count.group(1)) + 1))
        else:
            reply = match.group(1) if match else self.reply
        self._stream(prediction, _words(reply), tokens, cached, started, slow)

    def _cached_prefix(self, tokens: list[str]) -> int:
        n = 0
        for a, b in zip(self._cache, tokens[:-1], strict=False):
            if a != b:
                break
            n += 1
        self._cache = list(tokens)
        return n

    def _stream(self, prediction: Prediction, words: list[str], prompt: list[str],
                cached: int, started: float, delay: float) -> None:
        p = prediction.request.params
        stops = StopMatcher(p.stop)
        reason, stop_string, n, first = "eosFound", None, 0, None
        for word in words:
            if prediction.cancelled:
                reason = "userStopped"
                break
            if p.max_tokens is not None and 0 <= p.max_tokens <= n:
                reason = "maxPredictedTokensReached"
                break
            time.sleep(delay)
            n += 1
            first = first or time.perf_counter()
            text, stop_string = stops.feed(word)
            if text:
                prediction.emit(Fragment(text, 1))
            if stop_string is not None:
                reason = "stopStringFound"
                break
        if stop_string is None and (tail := stops.flush()):
            prediction.emit(Fragment(tail, 0))
        self._cache += words[:n]
        end = time.perf_counter()
        prediction.emit(Done(PredictionStats(
            stop_reason=reason, prompt_tokens=len(prompt), cached_tokens=cached,
            predicted_tokens=n, time_to_first_token_s=(first - started) if first else None,
            tokens_per_second=n / (end - started) if n else None, total_time_s=end - started,
            stop_string=stop_string)))


class FakeEngine(Engine):
    name = "fake"
    version = "1.0"

    def __init__(self, reply: str = DEFAULT_REPLY) -> None:
        self.reply = reply

    def create(self, spec: ModelSpec, options: LoadOptions) -> ModelInstance:
        return FakeInstance(spec, options, self.reply)
