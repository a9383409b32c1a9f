"""The llama.cpp engine on the default model: progress, KV reuse, sampling, cancellation."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmscli.engine import LoadOptions, ModelSpec, PredictionRequest, SamplingParams, get_engine
from lmscli.engine.base import ModelInstance
from tests.conftest import load_default_model, user_prompt

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def instance(default_model_file: Path) -> Iterator[ModelInstance]:
    # one slot: these tests compare predictions, and batch composition changes rounding
    inst = load_default_model(default_model_file, parallel=1)
    yield inst
    inst.close()


def run(inst: ModelInstance, prompt: str, cancel_after: int | None = None,
        **params: object) -> tuple[list, str]:
    events: queue.Queue = queue.Queue()
    prediction = inst.submit(PredictionRequest(prompt, SamplingParams(**params)), events.put)
    seen, text = [], []
    while True:
        ev = events.get(timeout=60)
        seen.append(ev)
        if ev.type == "fragment":
            text.append(ev.text)
            if cancel_after is not None and len(text) >= cancel_after:
                prediction.cancel()
        if ev.type in ("done", "failed"):
            return seen, "".join(text)


def test_load_reports_rising_progress(default_model_file: Path) -> None:
    spec = ModelSpec(path=str(default_model_file), model_key="x", max_context_length=8192)
    seen: list[float] = []
    inst = get_engine("llama.cpp").load(spec, LoadOptions(context_length=512), seen.append)
    inst.close()
    assert seen[0] == 0.0 and seen[-1] == 1.0 and len(seen) > 3
    assert seen == sorted(seen)


def test_prompt_progress_then_fragments_then_stats(instance: ModelInstance) -> None:
    prompt = user_prompt(instance, "Summarise: " + "the quick brown fox jumps. " * 120)
    events, text = run(instance, prompt, temperature=0, max_tokens=16)
    progress = [e.progress for e in events if e.type == "promptProgress"]
    first_fragment = next(i for i, e in enumerate(events) if e.type == "fragment")
    last_progress = max(i for i, e in enumerate(events) if e.type == "promptProgress")
    assert progress[0] == 0.0 and progress[-1] == 1.0 and len(progress) >= 4
    assert all(a < b for a, b in zip(progress, progress[1:], strict=False))
    assert last_progress < first_fragment
    stats = events[-1].stats
    assert (stats.stop_reason, stats.predicted_tokens) == ("maxPredictedTokensReached", 16) \
        or stats.stop_reason == "eosFound" and 0 < stats.predicted_tokens < 16
    assert stats.prompt_tokens > 700 and stats.time_to_first_token_s > 0
    assert stats.tokens_per_second and stats.tokens_per_second > 0  # any: the machine may be busy
    assert text.strip()


def test_shared_prefix_is_not_processed_again(instance: ModelInstance) -> None:
    base = "You are terse. " * 50
    run(instance, user_prompt(instance, base + "Name a colour."), temperature=0, max_tokens=4)
    events, _ = run(instance, user_prompt(instance, base + "Name a fruit."), temperature=0,
                    max_tokens=4)
    stats = events[-1].stats
    assert stats.cached_tokens > 150
    assert stats.cached_tokens < stats.prompt_tokens


def test_greedy_is_deterministic_and_seed_repeats(instance: ModelInstance) -> None:
    prompt = user_prompt(instance, "Write one sentence about the sea.")
    a = run(instance, prompt, temperature=0, max_tokens=20)[1]
    b = run(instance, prompt, temperature=0, max_tokens=20)[1]
    assert a == b and a
    c = run(instance, prompt, temperature=1.0, seed=7, max_tokens=20)[1]
    d = run(instance, prompt, temperature=1.0, seed=7, max_tokens=20)[1]
    assert c == d


def test_stop_string_cuts_the_text(instance: ModelInstance) -> None:
    prompt = user_prompt(instance, "Count from 1 to 10 separated by commas.")
    full = run(instance, prompt, temperature=0, max_tokens=40)[1]
    assert "3" in full
    events, text = run(instance, prompt, temperature=0, max_tokens=40, stop=["3"])
    assert events[-1].stats.stop_reason == "stopStringFound"
    assert events[-1].stats.stop_string == "3"
    assert "3" not in text and full.startswith(text)


def test_cancel_between_tokens(instance: ModelInstance) -> None:
    prompt = user_prompt(instance, "Tell me a long story about a dragon.")
    events, text = run(instance, prompt, cancel_after=3, temperature=0, max_tokens=300)
    stats = events[-1].stats
    assert stats.stop_reason == "userStopped"
    assert stats.predicted_tokens < 10
