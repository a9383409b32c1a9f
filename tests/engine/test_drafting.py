"""Draft-free speculative decoding: the n-gram drafter, and the step loop verifying its
drafts on the fake engine (whose KV bookkeeping fails on any position out of place): the
output is what it is without drafting, and the stats count the drafts."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from lmscli.engine import Done, Fragment, LoadOptions, ModelSpec
from lmscli.engine.base import ModelInstance
from lmscli.engine.drafting import GPU_COST, Drafter, DraftPool, StepCost, StepPlan
from lmscli.engine.fake import FakeEngine
from tests.cli.test_commands import lms
from tests.conftest import ThreadServer
from tests.engine.test_scheduler import Run
from tests.gguf_factory import make_gguf


def cheap_steps() -> StepCost:
    """Steps whose extra tokens cost a tenth of a one-token step (a GPU's)."""
    return StepCost(GPU_COST)


def drafter(context: list[int], pool: DraftPool | None = None) -> Drafter:
    return Drafter(context, pool or DraftPool())


def guess(d: Drafter, last: int, room: int = 64, cost: StepCost | None = None) -> list[int]:
    return d.draft(last, room, StepPlan(cost or cheap_steps()))


def test_the_draft_is_what_followed_the_longest_match() -> None:
    d = drafter([1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3, 4, 8, 0, 9, 1, 2, 3])
    assert guess(d, 4)[:3] == [8, 0, 9]  # "9 1 2 3 4" last led to 8 0 9
    d = drafter([7, 1, 2, 3, 4, 9, 9, 5, 0, 2, 3, 4, 6, 6, 7, 1, 2, 3])
    assert guess(d, 4)[:2] == [9, 9]  # "7 1 2 3 4" (5 tokens) beats the later "2 3 4"
    assert guess(d, 4, room=1) == [9]  # never more than there is room for
    assert guess(drafter([5, 6, 7, 8, 1, 2]), 3) == []  # "2 3" never occurred
    loop = list(range(10, 30))
    d = drafter([9, *loop, *loop])
    looped = guess(d, 10)
    assert len(looped) > 20 and looped == (loop[1:] + loop)[:len(looped)]  # past the end


def test_other_sequences_of_the_model_are_drafted_from() -> None:
    pool = DraftPool()
    earlier = drafter([50, 51, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], pool)
    assert earlier.own in pool.contexts
    d = drafter([60, 61, 1, 2, 3], pool)
    assert guess(d, 4)[:8] == [5, 6, 7, 8, 9, 10, 11, 12]


def test_a_replacement_the_model_makes_twice_is_drafted() -> None:
    d = drafter([9, 1, 2, 70, 3, 4, 5, 6, 7, 8, 11, 12, 0, 9, 1])
    assert guess(d, 2)[:3] == [70, 3, 4]
    d.rejected(70, 80)  # the model wrote 80 for 70
    d.rejected(70, 80)
    d.extend([2])
    assert guess(d, 80)[:3] == [3, 4, 5]  # "1 2 80" is "1 2 70" now
    d.extend([80, 3, 4, 5, 6, 7, 8, 11, 9, 1])
    assert guess(d, 2)[:3] == [80, 3, 4]  # and 70 is written 80


def test_the_draft_is_as_long_as_the_step_cost_pays_for() -> None:
    context = list(range(100)) * 2
    cheap = guess(drafter(context), 0, room=128)
    costly = StepCost(((1, 1.0), (2, 2.0)))  # every token a whole step: guesses never pay
    assert len(cheap) >= 16 and cheap[:3] == [1, 2, 3]
    assert guess(drafter(context), 0, room=128, cost=costly) == []


def test_an_earlier_answer_that_matches_further_back_leads() -> None:
    """A retry: the prompt quotes a 70-token passage four times, going on with 7 each time;
    the earlier answer quoted it too and went on with 9. Both match as far back as the
    passage, but only the earlier answer's match goes on past it (the same prompt): 9."""
    passage = list(range(100, 170))
    prompt = [50, *[t for _ in range(4) for t in (*passage, 7)], 60]
    pool = DraftPool()
    drafter([*prompt, *passage, 9, 9, 9, 9], pool)  # the earlier ask and its answer
    d = drafter([*prompt, *passage[:-1]], pool)
    assert guess(d, passage[-1])[:2] == [9, 9]


def test_a_guess_is_priced_against_the_whole_batch() -> None:
    """On a CPU a guess from a short match pays less beside three other sequences' tokens
    (a batch of four already writes more per unit of time) than alone."""
    cost = StepCost()  # the CPU's
    d = drafter([*range(10, 18), 1, *range(10, 15)])  # "10 … 15" once before
    alone = d.draft(15, 64, StepPlan(cost))
    beside_three = d.draft(15, 64, StepPlan(cost, tokens=4, expected=4.0))
    assert alone and len(beside_three) < len(alone)


def test_drafts_the_model_keeps_rejecting_stop() -> None:
    d = drafter([1, 2, 3, 4, 5, 6, 7, 8] * 4)
    assert guess(d, 1)
    for _ in range(30):
        d.draft(1, 64, StepPlan(cheap_steps()))
        d.verified(0)
    assert guess(d, 1) == []


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    make_gguf(path, name="Tiny", context_length=4096)
    return path


def load(model_file: Path, speculative: str, parallel: int = 1) -> ModelInstance:
    spec = ModelSpec(path=str(model_file), model_key="tiny", max_context_length=4096)
    return FakeEngine().load(spec, LoadOptions(parallel=parallel,
                                               speculative=speculative))  # type: ignore[arg-type]


SOURCE = " ".join(f"w{i % 23} x{i % 7}" for i in range(60))  # text with repeats in it
PROMPT = f"Rewrite this: {SOURCE} [[reply: {SOURCE} and then {SOURCE}]]"


def answers(model_file: Path, speculative: str, **params: object
            ) -> list[tuple[str, Done]]:
    inst = load(model_file, speculative, parallel=2)
    try:
        runs = [Run(inst, PROMPT, **params), Run(inst, PROMPT + " again", **params)]
        ends = [r.wait() for r in runs]
        return [(r.text, end) for r, end in zip(runs, ends, strict=True)]  # type: ignore[misc]
    finally:
        inst.close()


@pytest.mark.parametrize("params", [{}, {"max_tokens": 37}, {"stop": ["w9 x2 w10"]}])
def test_drafting_writes_the_same_text_in_fewer_steps(model_file: Path, params: dict) -> None:
    plain = answers(model_file, "off", **params)
    drafted = answers(model_file, "ngram", **params)
    assert [text for text, _ in drafted] == [text for text, _ in plain]
    for (_, without), (_, done) in zip(plain, drafted, strict=True):
        assert done.stats.stop_reason == without.stats.stop_reason
        assert done.stats.predicted_tokens == without.stats.predicted_tokens
        assert without.stats.draft_tokens is None
        assert done.stats.draft_tokens and done.stats.accepted_draft_tokens
        lms = done.stats.to_lms()
        assert lms["totalDraftTokensCount"] == (lms["acceptedDraftTokensCount"]
                                                + lms["rejectedDraftTokensCount"])


def test_a_chat_continues_from_a_cache_that_drafting_left_exact(model_file: Path) -> None:
    """Rejected guesses leave the KV cache: the next turn reuses the slot's tokens as they
    are, and the fake engine refuses any decode that does not follow them."""
    inst = load(model_file, "ngram")
    try:
        first = Run(inst, PROMPT)
        assert isinstance(first.wait(), Done)
        follow = Run(inst, PROMPT + first.text + " <|im_start|>user [[reply: a b a b c]]")
        done = follow.wait()
        assert isinstance(done, Done) and follow.text == "a b a b c"
        assert done.stats.cached_tokens > 100
    finally:
        inst.close()


def test_lms_load_turns_drafting_on_and_every_surface_reports_it(
        fake_server: ThreadServer, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = lms(capsys, "load", "tiny-chat", "--speculative", "ngram")
    assert code == 0, err
    code, out, _ = lms(capsys, "ps", "--json")
    assert json.loads(out)[0]["speculative"] == "ngram"
    ask = "Repeat: a b c d a b c d [[reply: a b c d a b c d a b c d a b c d]]"
    r = httpx.post(fake_server.base_url + "/api/v0/chat/completions", timeout=30, json={
        "model": "tiny-chat", "messages": [{"role": "user", "content": ask}]})
    stats, usage = r.json()["stats"], r.json()["usage"]
    assert stats["total_draft_tokens_count"] > 0 and stats["accepted_draft_tokens_count"] > 0
    assert usage["completion_tokens_details"]["accepted_prediction_tokens"] == \
        stats["accepted_draft_tokens_count"]
    from lmscli.client import Client

    with Client(fake_server.base_url.removeprefix("http://")) as client:
        model = client.llm.model("tiny-chat")
        result = model.respond(ask)
    assert result.content.strip() == "a b c d a b c d a b c d a b c d"
    assert result.stats.accepted_draft_tokens_count > 0
    assert result.stats.total_draft_tokens_count == (result.stats.accepted_draft_tokens_count
                                                     + result.stats.rejected_draft_tokens_count)
    code, _, err = lms(capsys, "load", "other-model", "--speculative", "lots")
    assert code == 1 and "--speculative" in err and "Traceback" not in err


def test_a_request_drafts_from_an_earlier_answer_and_can_say_off(model_file: Path) -> None:
    """The second asking of a question drafts its whole answer from the first one's (the
    pool); a request with speculative "off" drafts nothing; a step's accepted tokens come as
    one fragment."""
    inst = load(model_file, "ngram")
    ask = "Count for me [[count: 40]]"  # the answer (n1 … n40) is not in the prompt
    try:
        first = Run(inst, ask)
        assert isinstance(done := first.wait(), Done)
        assert not done.stats.accepted_draft_tokens  # nothing in the prompt to copy
        again = Run(inst, ask)
        assert isinstance(done := again.wait(), Done) and again.text == first.text
        assert done.stats.accepted_draft_tokens >= 30
        fragments = [e for _, e in again.seen if isinstance(e, Fragment)]
        assert len(fragments) < 10 and sum(f.tokens for f in fragments) == 40
        short = Run(inst, ask, draft_max=3)  # LM Studio's numDraftTokensExact, per request
        assert isinstance(done := short.wait(), Done) and short.text == first.text
        assert done.stats.accepted_draft_tokens >= 20
        assert max(f.tokens for _, f in short.seen if isinstance(f, Fragment)) <= 4
        least = Run(inst, ask, draft_min=50)  # no guess is that long: nothing is drafted
        assert isinstance(done := least.wait(), Done) and not done.stats.draft_tokens
        off = Run(inst, ask, speculative="off")
        assert isinstance(done := off.wait(), Done) and off.text == first.text
        assert done.stats.draft_tokens is None
    finally:
        inst.close()
