"""What goes into and comes out of an engine: plain data, no llama.cpp, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

StopReason = Literal[
    "eosFound", "stopStringFound", "maxPredictedTokensReached", "contextLengthReached",
    "toolCalls", "userStopped", "modelUnloaded", "failed",
]
Status = Literal["idle", "loading", "processingPrompt", "generating", "computingEmbedding"]


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 40
    min_p: float = 0.05
    repeat_penalty: float = 1.1
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from any token already seen
    frequency_penalty: float = 0.0  # subtracted per time a token was seen
    seed: int | None = None
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)


Speculative = Literal["off", "ngram"]


@dataclass(frozen=True)
class DraftModel:
    """A small model that guesses the main model's next tokens: same vocabulary, cheaper."""

    path: str
    model_key: str


@dataclass
class PredictionRequest:
    """A prompt that is already templated text. ``grammar`` is GBNF that constrains sampling."""

    prompt: str
    params: SamplingParams = field(default_factory=SamplingParams)
    grammar: str | None = None
    add_bos: bool | None = None  # None: the model's own preference
    # speculative decoding for this request; None: the model's load setting
    speculative: Speculative | None = None
    draft_model: DraftModel | None = None  # drafts come from this model (LM Studio's draftModel)
    # LM Studio's numDraftTokensExact and minDraftLengthToConsider; None: the load's settings
    draft_max: int | None = None
    draft_min: int | None = None


@dataclass
class PromptProgress:
    progress: float
    cached_tokens: int
    processed_tokens: int
    total_tokens: int
    type: Literal["promptProgress"] = "promptProgress"


@dataclass
class Fragment:
    text: str
    tokens: int
    type: Literal["fragment"] = "fragment"


@dataclass
class PredictionStats:
    stop_reason: StopReason
    prompt_tokens: int = 0
    cached_tokens: int = 0
    predicted_tokens: int = 0
    time_to_first_token_s: float | None = None
    tokens_per_second: float | None = None
    total_time_s: float = 0.0
    stop_string: str | None = None
    draft_tokens: int | None = None  # drafted and verified; None: no drafting
    accepted_draft_tokens: int | None = None
    draft_model: str | None = None  # the draft model's key, when one drafted

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.predicted_tokens

    @property
    def drafts(self) -> tuple[int, int] | None:
        """(drafted, accepted) tokens, or None when the model did not draft."""
        if self.draft_tokens is None or self.accepted_draft_tokens is None:
            return None
        return self.draft_tokens, self.accepted_draft_tokens

    def to_lms(self) -> dict[str, Any]:
        """LM Studio's LLMPredictionStats (camelCase), plus the cached prompt token count."""
        out: dict[str, Any] = {
            "stopReason": self.stop_reason,
            "tokensPerSecond": self.tokens_per_second,
            "timeToFirstTokenSec": self.time_to_first_token_s,
            "totalTimeSec": self.total_time_s,
            "promptTokensCount": self.prompt_tokens,
            "predictedTokensCount": self.predicted_tokens,
            "totalTokensCount": self.total_tokens,
            "cachedPromptTokensCount": self.cached_tokens,
        }
        if self.stop_string is not None:
            out["stopString"] = self.stop_string
        if self.drafts is not None:
            # LM Studio's draft statistics; a draft is verified whole, so none is ignored
            drafted, accepted = self.drafts
            if self.draft_model is not None:
                out["usedDraftModelKey"] = self.draft_model
            out |= {"totalDraftTokensCount": drafted, "acceptedDraftTokensCount": accepted,
                    "rejectedDraftTokensCount": drafted - accepted,
                    "ignoredDraftTokensCount": 0}
        return {k: v for k, v in out.items() if v is not None}


@dataclass
class Done:
    stats: PredictionStats
    type: Literal["done"] = "done"


@dataclass
class Failed:
    """``code`` names a failure the caller can act on (``"grammar"``: the grammar was
    rejected; ``QUEUE_FULL``: refused from a full queue after ``submit`` took it)."""

    message: str
    code: str | None = None
    type: Literal["failed"] = "failed"


Event = PromptProgress | Fragment | Done | Failed


@dataclass
class LoadOptions:
    context_length: int | None = None
    gpu_ratio: float | None = None  # None: the engine decides
    seed: int | None = None
    parallel: int = 4  # predictions decoded together (LM Studio's max concurrent predictions)
    max_queue: int = 64  # predictions waiting for a slot before submit refuses more
    speculative: Speculative = "ngram"  # drafts from the context and other requests; "off"
    draft_model: DraftModel | None = None
    draft_max: int | None = None  # most tokens drafted at once; None: as the cost model finds
    draft_min: int = 0  # a shorter draft is not verified


QUEUE_FULL = "queue_full"


class QueueFull(Exception):
    """``submit`` refused a prediction: every slot is busy and the waiting queue is full."""
