"""Slots, the sequences that run on them, and the batch one step decodes.

A slot is one llama.cpp sequence id. Its ``tokens`` are what its KV cache holds, and stay
there after a prediction ends, so that a chat's next turn finds its prefix. Pure Python: the
fake and the llama.cpp engine share it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence as Sequence_
from dataclasses import dataclass, field
from typing import Any

from lmscli.engine.textstream import StopMatcher, Utf8Stream
from lmscli.engine.types import Done, Fragment, PredictionStats, PromptProgress, StopReason


@dataclass
class Slot:
    id: int
    tokens: list[int] = field(default_factory=list)
    prompt_len: int = 0  # how many of ``tokens`` were the last prompt (the rest: its answer)
    saved: int = 0  # len(tokens) when they were last found in, or saved to, the prompt cache
    last_used: float = 0.0
    seq: Sequence | None = None


@dataclass
class Choice:
    slot: Slot  # where the prediction runs
    source: Slot  # where its cached prefix comes from (``slot`` itself, or copied)
    reuse: int  # prompt tokens that need no decoding

    def keep(self) -> set[int]:
        return {self.slot.id, self.source.id}


def common_prefix(a: Sequence_[int], b: Sequence_[int]) -> int:
    """How many leading items ``a`` and ``b`` share (both lists, or both arrays)."""
    n = min(len(a), len(b))
    i = 0
    while i < n:  # compare in blocks: a slice comparison runs in C
        j = min(i + 256, n)
        if a[i:j] != b[i:j]:
            while a[i] == b[i]:
                i += 1
            return i
        i = j
    return n


def choose_slot(slots: list[Slot], prompt: list[int]) -> Choice | None:
    """The idle slot for ``prompt``: the one whose last prompt it extends (a chat's next turn,
    or a retry), else an empty or the least recently used one, so that other chats' caches
    survive; the longest cached prefix anywhere is then copied in (a shared system prompt).
    One prompt token is always left to decode, for fresh logits."""
    idle = [s for s in slots if s.seq is None]
    if not idle:
        return None
    most = len(prompt) - 1
    prefix = {s.id: min(common_prefix(s.tokens, prompt), most) for s in slots}
    continued = [s for s in idle if prefix[s.id] and prefix[s.id] >= min(s.prompt_len, most)]
    if continued:
        slot = max(continued, key=lambda s: prefix[s.id])
    else:
        slot = min(idle, key=lambda s: (bool(s.tokens), s.last_used))
    source = max(slots, key=lambda s: (prefix[s.id], s is slot))
    if prefix[source.id] <= prefix[slot.id]:
        source = slot
    return Choice(slot, source, prefix[source.id])


class Batch:
    """The tokens of one decode: each with its position, sequence and whether to keep logits."""

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.positions: list[int] = []
        self.seq_ids: list[int] = []
        self.logits: list[bool] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, token: int, pos: int, seq_id: int, logits: bool) -> int:
        self.tokens.append(token)
        self.positions.append(pos)
        self.seq_ids.append(seq_id)
        self.logits.append(logits)
        return len(self.tokens) - 1

    def keep_only(self, seq_ids: set[int]) -> None:
        """Drop the other sequences' tokens. Generating tokens come first in a batch, so
        keeping only those leaves their indexes where they were."""
        rows = [r for r in zip(self.tokens, self.positions, self.seq_ids, self.logits,
                               strict=True) if r[2] in seq_ids]
        self.tokens = [r[0] for r in rows]
        self.positions = [r[1] for r in rows]
        self.seq_ids = [r[2] for r in rows]
        self.logits = [r[3] for r in rows]


class Sequence:
    """One admitted prediction: its prompt, sampler, position and the text it produced."""

    def __init__(self, prediction: Any, prompt: list[int], slot: Slot, cached: int,
                 sampler: Any) -> None:
        params = prediction.request.params
        self.prediction = prediction
        self.prompt = prompt
        self.slot = slot
        self.cached = cached
        self.sampler = sampler
        self.n_past = cached
        self.last_token = -1
        self.predicted = 0
        self.first_at: float | None = None
        self.limit: int | None = (params.max_tokens if params.max_tokens is not None
                                  and params.max_tokens >= 0 else None)
        self.logits_at = -1  # index of this sequence's logits in the current batch
        self.chunk = 0  # tokens this sequence has in the current batch
        self.drafter: Any = None  # its n-gram drafter, once it generates with drafting on
        self.draft: list[int] = []  # tokens guessed to follow last_token, in this batch
        self.draft_at: list[int] = []  # the batch indexes of their logits
        self.drafted = 0  # draft tokens verified, all steps
        self.draft_model: str | None = None  # the key of the draft model that guessed
        self.accepted = 0  # of those, the ones the model wrote
        self._stops = StopMatcher(params.stop)
        self._utf8 = Utf8Stream()
        self._text: list[str] = []  # written this step, not yet emitted
        self._tokens = 0

    @property
    def drafting(self) -> bool:
        return self.drafter is not None or self.draft_model is not None

    @property
    def prompting(self) -> bool:
        return self.n_past < len(self.prompt)

    def progress(self) -> None:
        total = len(self.prompt)
        self.prediction.emit(PromptProgress(self.n_past / total, self.cached, self.n_past,
                                            total))

    def take(self, token: int, piece: bytes) -> str | None:
        """Emit a sampled token's text; returns the stop string it completed, if any."""
        self.predicted += 1
        self.last_token = token
        if self.first_at is None:
            self.first_at = time.perf_counter()
        text, stop = self._stops.feed(self._utf8.feed(piece))
        self._tokens += 1
        if text:
            self._text.append(text)
        return stop

    def flush(self) -> None:
        """Emit the text of the step's tokens as one fragment (a draft accepts several)."""
        if self._text:
            self.prediction.emit(Fragment("".join(self._text), self._tokens))
            self._text, self._tokens = [], 0

    def finish(self, reason: StopReason, stop: str | None) -> None:
        self.flush()
        if stop is None:
            tail = self._stops.feed(self._utf8.flush())[0] + self._stops.flush()
            if tail:
                self.prediction.emit(Fragment(tail, 0))
        self.prediction.emit(Done(self.stats(reason, stop)))

    def stats(self, reason: StopReason, stop: str | None) -> PredictionStats:
        ended = time.perf_counter()
        started = self.prediction.submitted_at
        first = self.first_at
        decode_time = ended - first if first is not None else 0.0
        tps = (self.predicted - 1) / decode_time if self.predicted > 1 and decode_time > 0 \
            else None
        return PredictionStats(
            stop_reason=reason, prompt_tokens=len(self.prompt), cached_tokens=self.cached,
            predicted_tokens=self.predicted,
            time_to_first_token_s=(first - started) if first is not None else None,
            tokens_per_second=tps, total_time_s=ended - started, stop_string=stop,
            draft_tokens=self.drafted if self.drafting else None,
            accepted_draft_tokens=self.accepted if self.drafting else None,
            draft_model=self.draft_model,
        )
