"""What a prediction gives back: fragments, stats, model info and the final result."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

_CAMEL = {"stop_reason": "stopReason", "tokens_per_second": "tokensPerSecond",
          "time_to_first_token_sec": "timeToFirstTokenSec", "total_time_sec": "totalTimeSec",
          "prompt_tokens_count": "promptTokensCount",
          "predicted_tokens_count": "predictedTokensCount",
          "total_tokens_count": "totalTokensCount",
          "cached_prompt_tokens_count": "cachedPromptTokensCount",
          "stop_string": "stopString",
          "used_draft_model_key": "usedDraftModelKey",
          "total_draft_tokens_count": "totalDraftTokensCount",
          "accepted_draft_tokens_count": "acceptedDraftTokensCount",
          "rejected_draft_tokens_count": "rejectedDraftTokensCount",
          "ignored_draft_tokens_count": "ignoredDraftTokensCount"}


@dataclass(frozen=True)
class LlmPredictionFragment:
    content: str
    tokens_count: int = 1
    contains_drafted: bool = False
    reasoning_type: str = "none"

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LlmPredictionFragment:
        return cls(data["content"], data.get("tokensCount", 1),
                   data.get("containsDrafted", False), data.get("reasoningType", "none"))


@dataclass(frozen=True)
class LlmPredictionStats:
    stop_reason: str
    tokens_per_second: float | None = None
    time_to_first_token_sec: float | None = None
    total_time_sec: float | None = None
    prompt_tokens_count: int | None = None
    predicted_tokens_count: int | None = None
    total_tokens_count: int | None = None
    cached_prompt_tokens_count: int | None = None
    stop_string: str | None = None
    # speculative decoding, when the model drafts (lmstudio-python's names); the key is
    # there when a draft model drafted
    used_draft_model_key: str | None = None
    total_draft_tokens_count: int | None = None
    accepted_draft_tokens_count: int | None = None
    rejected_draft_tokens_count: int | None = None
    ignored_draft_tokens_count: int | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LlmPredictionStats:
        return cls(**{f.name: data.get(_CAMEL[f.name]) for f in fields(cls)})


@dataclass(frozen=True)
class LlmInfo:
    model_key: str
    display_name: str
    path: str
    size_bytes: int
    format: str = "gguf"
    architecture: str | None = None
    params_string: str | None = None
    max_context_length: int | None = None
    trained_for_tool_use: bool = False
    vision: bool = False
    identifier: str | None = None
    context_length: int | None = None

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> LlmInfo:
        return cls(data["modelKey"], data.get("displayName", data["modelKey"]), data["path"],
                   data.get("sizeBytes", 0), data.get("format", "gguf"),
                   data.get("architecture"), data.get("paramsString"),
                   data.get("maxContextLength"), data.get("trainedForToolUse", False),
                   data.get("vision", False), data.get("identifier"),
                   data.get("contextLength"))


@dataclass(frozen=True)
class PredictionResult:
    content: str
    parsed: Any
    structured: bool
    stats: LlmPredictionStats
    model_info: LlmInfo

    def __str__(self) -> str:
        if self.structured and isinstance(self.parsed, dict | list):
            return json.dumps(self.parsed, indent=2, ensure_ascii=False)
        return self.content


@dataclass(frozen=True)
class PredictionRoundResult(PredictionResult):
    round_index: int = 0


@dataclass(frozen=True)
class ActResult:
    rounds: int
    total_time_seconds: float
