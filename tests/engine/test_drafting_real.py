"""Draft-free speculative decoding on llama.cpp with the default model: a rewrite of code
given in the prompt comes out token for token as it does without drafting, greedy or
sampled with a seed, and much of it was drafted. Short (64 tokens): past a few hundred tokens
of context llama.cpp sums a batch in another order than one token, and nearly tied tokens
can swap. Without a repeat penalty: with one, llama.cpp's
answers with and without drafting can part after a while, llama-server's as well (issue 21's
notes)."""

from __future__ import annotations

import queue
from pathlib import Path

import pytest

from lmscli.engine import (
    DraftModel,
    LoadOptions,
    ModelSpec,
    PredictionRequest,
    SamplingParams,
    get_engine,
)
from lmscli.engine.base import DraftModelError
from tests.conftest import user_prompt

pytestmark = pytest.mark.real
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def cheapest(items):
    best = None
    for item in items:
        if best is None or item.price < best.price:
            best = item
    return best
'''
ASK = f"Rewrite this Python code, renaming items to products:\n\n{CODE}"


def answer(model_file: Path, speculative: str, draft: DraftModel | None = None,
           **params: object) -> tuple[str, object]:
    spec = ModelSpec(path=str(model_file), model_key="smollm2-135m-instruct",
                     max_context_length=8192)
    inst = get_engine("llama.cpp").load(spec, LoadOptions(
        context_length=2048, parallel=1, speculative=speculative,  # type: ignore[arg-type]
        draft_model=draft))
    try:
        events: queue.Queue = queue.Queue()
        request = PredictionRequest(user_prompt(inst, ASK),
                                    SamplingParams(max_tokens=64, **params))  # type: ignore[arg-type]
        inst.submit(request, events.put)
        text = []
        while (event := events.get(timeout=120)).type not in ("done", "failed"):
            if event.type == "fragment":
                text.append(event.text)
        assert event.type == "done", event
        return "".join(text), event.stats
    finally:
        inst.close()


@pytest.mark.parametrize("params", [{"temperature": 0, "repeat_penalty": 1.0},
                                    {"temperature": 0.7, "seed": 7, "repeat_penalty": 1.0}])
def test_drafting_keeps_the_models_own_answer(default_model_file: Path, params: dict) -> None:
    plain, _ = answer(default_model_file, "off", **params)
    drafted, stats = answer(default_model_file, "ngram", **params)
    assert drafted == plain
    assert stats.accepted_draft_tokens >= 15  # type: ignore[attr-defined]
    print(f"{params}: {stats.accepted_draft_tokens} of {stats.draft_tokens} drafted tokens "  # type: ignore[attr-defined]
          f"accepted, {stats.predicted_tokens} written")  # type: ignore[attr-defined]


def test_a_draft_model_drafting_for_itself_keeps_the_answer(default_model_file: Path) -> None:
    """SmolLM2 drafting for itself: every guess is the model's own, so the answer is the
    one without drafting and the stats name the draft model."""
    params = {"temperature": 0, "repeat_penalty": 1.0}
    plain, _ = answer(default_model_file, "off", **params)
    draft = DraftModel(str(default_model_file), "smollm2-draft")
    drafted, stats = answer(default_model_file, "off", draft=draft, **params)
    assert drafted == plain
    assert stats.draft_model == "smollm2-draft"  # type: ignore[attr-defined]
    assert stats.accepted_draft_tokens > 0.9 * stats.draft_tokens  # type: ignore[attr-defined]
    assert stats.to_lms()["usedDraftModelKey"] == "smollm2-draft"  # type: ignore[attr-defined]


def test_a_draft_model_of_another_vocabulary_is_refused(default_model_file: Path,
                                                         qwen_model_file: Path) -> None:
    other = DraftModel(str(qwen_model_file), "qwen2.5-coder-0.5b-instruct")
    spec = ModelSpec(path=str(default_model_file), model_key="smollm2-135m-instruct")
    with pytest.raises(DraftModelError, match="cannot draft for this model: it has 151936 "
                                              "tokens, the model 49152"):
        get_engine("llama.cpp").load(spec, LoadOptions(context_length=512, parallel=1,
                                                       draft_model=other))
    inst = get_engine("llama.cpp").load(spec, LoadOptions(context_length=512, parallel=1))
    try:
        events: queue.Queue = queue.Queue()
        inst.submit(PredictionRequest(user_prompt(inst, "Hi"), draft_model=other), events.put)
        while (event := events.get(timeout=120)).type not in ("done", "failed"):
            pass
        assert event.type == "failed" and event.code == "draft_model"
        assert "cannot draft for this model" in event.message
        done = queue.Queue()
        inst.submit(PredictionRequest(user_prompt(inst, "Hi"),  # the model still answers
                                      SamplingParams(max_tokens=4)), done.put)
        while (event := done.get(timeout=120)).type not in ("done", "failed"):
            pass
        assert event.type == "done"
    finally:
        inst.close()
