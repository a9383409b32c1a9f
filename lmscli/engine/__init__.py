"""Engines run models. ``get_engine`` picks one by name (``LMSCLI_ENGINE``, default llama.cpp)."""

from __future__ import annotations

import os

from lmscli.engine.base import DraftModelError, Engine, ModelInstance, ModelSpec, Prediction
from lmscli.engine.types import (
    Done,
    DraftModel,
    Event,
    Failed,
    Fragment,
    LoadOptions,
    PredictionRequest,
    PredictionStats,
    PromptProgress,
    QueueFull,
    SamplingParams,
)

__all__ = [
    "Done", "DraftModel", "DraftModelError", "Engine", "Event", "Failed", "Fragment", "LoadOptions",
    "ModelInstance", "ModelSpec", "Prediction", "PredictionRequest", "PredictionStats",
    "PromptProgress", "QueueFull", "SamplingParams",
    "get_engine",
]


def get_engine(name: str | None = None) -> Engine:
    """The engine named, else ``LMSCLI_ENGINE``, else llama.cpp (imported only here)."""
    name = name or os.environ.get("LMSCLI_ENGINE") or "llama.cpp"
    if name == "fake":
        from lmscli.engine.fake import FakeEngine

        return FakeEngine()
    if name in ("llama.cpp", "llama"):
        from lmscli.engine.llama import LlamaEngine

        return LlamaEngine()
    raise ValueError(f"Unknown engine {name!r}: use 'llama.cpp' or 'fake'.")
