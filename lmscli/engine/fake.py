"""A deterministic engine for fast tests: no weights, the same scheduler and events as llama.cpp.

Tokens are whitespace-separated words. The reply is ``FakeEngine.reply`` unless the prompt
asks for one with ``[[reply: text]]``; ``[[fail]]`` makes the prediction fail and
``[[slow]]`` adds a delay per token so that cancellation and interleaving can be tested;
``[[count: N]]`` replies ``n1 n2 … nN``, text that the prompt itself does not contain.
An embedding input with ``[[slow]]`` takes SLOW_S, one with ``[[toolong]]`` is refused.
A grammar containing ``!invalid`` is rejected, as llama.cpp rejects a grammar it can't parse.
Each sequence's "KV cache" is the list of tokens decoded into it (``kv``): a decode at a
position that does not follow what the sequence holds fails, as it would corrupt llama.cpp's.
"""

from __future__ import annotations

import re
import time
from array import array
from collections import deque
from dataclasses import dataclass

from lmscli.engine.backend import (
    Backend,
    GrammarError,
    ModelSpec,
    PredictionFailure,
    ProgressFn,
)
from lmscli.engine.base import Engine
from lmscli.engine.drafting import GPU_COST, StepCost
from lmscli.engine.promptcache import State
from lmscli.engine.slots import Batch
from lmscli.engine.types import LoadOptions, PredictionRequest

DEFAULT_REPLY = "Hello! I am the fake engine."
STATE_MAGIC = b"FAKEKV"
EOS = 0
SLOW_S = 0.05


def _last_turn(prompt: str) -> str:
    """Directives count only in the newest user turn, not in the history before it."""
    marker = "<|im_start|>user"
    return prompt[prompt.rindex(marker):] if marker in prompt else prompt


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*|\s+", text)


@dataclass
class FakeSampler:
    reply: list[int]
    delay: float
    at: int = 0

    def next(self) -> int:
        time.sleep(self.delay)
        if self.at >= len(self.reply):
            return EOS
        self.at += 1
        return self.reply[self.at - 1]


class FakeBackend(Backend):
    name = "fake"
    n_batch = 16  # small, so that prompts take several steps as long ones do on llama.cpp

    def __init__(self, spec: ModelSpec, options: LoadOptions, reply: str) -> None:
        super().__init__(spec, options)
        self.reply = reply
        self._ids: dict[str, int] = {}
        self._words: list[str] = [""]  # token 0 is the end of a reply
        # the sequence ids of recent steps, so that tests can see what was decoded together
        self.decoded_batches: deque[list[int]] = deque(maxlen=1000)
        self.kv: dict[int, list[int]] = {}
        self.decoded_tokens = 0  # prompt and answer tokens decoded, all sequences
        # its decodes take no time to speak of: drafts are priced as on a GPU
        self.step_cost = StepCost(GPU_COST)

    def load(self, context_length: int, n_seq: int, on_progress: ProgressFn | None) -> int:
        with open(self.spec.path, "rb") as f:
            if f.read(4) != b"GGUF":
                from lmscli.errors import InvalidModelFileError

                raise InvalidModelFileError(f"Failed to load {self.spec.model_key}: not GGUF")
        for step in (0.0, 0.5, 1.0):
            if on_progress and on_progress(step) is False:
                raise RuntimeError("load cancelled")
        return context_length

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        return [self._id(w) for w in _words(text)]

    def _id(self, word: str) -> int:
        if word not in self._ids:
            self._ids[word] = len(self._words)
            self._words.append(word)
        return self._ids[word]

    def embed_texts(self, texts: list[str], first: int = 0) -> list[list[float]]:
        for i, text in enumerate(texts):
            if "[[slow]]" in text:
                time.sleep(SLOW_S)
            if "[[toolong]]" in text:
                raise ValueError(f"Input {first + i} is longer than the context.")
        return [[float(len(t)), float(len(_words(t))), 1.0] for t in texts]

    def check_grammar(self, grammar: str) -> str | None:
        return "the grammar has '!invalid' in it" if "!invalid" in grammar else None

    def new_sampler(self, request: PredictionRequest) -> FakeSampler:
        if request.grammar and (problem := self.check_grammar(request.grammar)):
            raise GrammarError(problem)
        asked = _last_turn(request.prompt)
        if "[[fail]]" in asked:
            raise PredictionFailure("The fake engine was asked to fail.")
        match = re.search(r"\[\[reply: (.*)\]\]", asked, re.S)  # to the last ]]
        count = re.search(r"\[\[count: (\d+)\]\]", asked)
        if count:
            reply = " ".join(f"n{i}" for i in range(1, int(count.group(1)) + 1))
        else:
            reply = match.group(1) if match else self.reply
        delay = SLOW_S if "[[slow]]" in asked else 0.0
        return FakeSampler(self.tokenize(reply, False), delay)

    def decode(self, batch: Batch) -> int:
        self.decoded_batches.append(sorted(set(batch.seq_ids)))
        ends = {seq: len(self.kv.get(seq, [])) for seq in set(batch.seq_ids)}
        for pos, seq in zip(batch.positions, batch.seq_ids, strict=True):
            if pos != ends[seq]:
                raise RuntimeError(f"sequence {seq} decodes position {pos}, "
                                   f"but holds {ends[seq]}")
            ends[seq] += 1
        for token, seq in zip(batch.tokens, batch.seq_ids, strict=True):
            self.kv.setdefault(seq, []).append(token)
        self.decoded_tokens += len(batch)
        return 0

    def seq_rm(self, seq_id: int, start: int) -> bool:
        self.kv[seq_id] = self.kv.get(seq_id, [])[:start]
        return True

    def seq_cp(self, src: int, dst: int, count: int) -> None:
        self.kv[dst] = self.kv.get(src, [])[:count]

    def save_state(self, seq_id: int) -> bytes | None:
        return STATE_MAGIC + array("i", self.kv.get(seq_id, [])).tobytes()

    def restore_state(self, seq_id: int, data: State) -> bool:
        body = data[len(STATE_MAGIC):]
        if not data.startswith(STATE_MAGIC) or len(body) % 4 or self.kv.get(seq_id):
            return False
        tokens = array("i")
        tokens.frombytes(body)
        self.kv[seq_id] = tokens.tolist()
        return True

    def sample(self, sampler: FakeSampler, index: int) -> int:
        return sampler.next()

    def is_eog(self, token: int) -> bool:
        return token == EOS

    def piece(self, token: int) -> bytes:
        return self._words[token].encode("utf-8")


class FakeEngine(Engine):
    name = "fake"
    version = "1.0"

    def __init__(self, reply: str = DEFAULT_REPLY) -> None:
        self.reply = reply

    def backend(self, spec: ModelSpec, options: LoadOptions) -> Backend:
        return FakeBackend(spec, options, self.reply)
