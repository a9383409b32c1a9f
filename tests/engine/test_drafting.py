"""Draft-free speculative decoding: the n-gram drafter, and the step loop verifying its
drafts on the fake engine (whose KV bookkeeping fails on any position out of place): the
output is what it is without drafting, and the stats count the drafts."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from lmscli.engine import Done, LoadOptions, ModelSpec
from lmscli.engine.base import ModelInstance
from lmscli.engine.drafting import DRAFT_MAX, PAUSE_STEPS, Drafter
from lmscli.engine.fake import FakeEngine
from tests.cli.test_commands import lms
from tests.conftest import ThreadServer
from tests.engine.test_scheduler import Run
from tests.gguf_factory import make_gguf


def test_the_draft_is_what_followed_the_longest_recent_match() -> None:
    # NGRAM_MIN (4) tokens must match
    d = Drafter([1, 2, 3, 4, 5, 6, 7, 9, 1, 2, 3, 4, 8, 0, 9, 1, 2, 3])
    assert d.draft(4, 10) == [8, 0, 9, 1, 2, 3]  # "1 2 3 4" last led to 8 0 9 …
    assert Drafter([1, 2, 3, 4, 5, 9, 2, 3]).draft(4, 10) == []  # "2 3 4": too short
    d = Drafter([1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 2, 3, 4, 5, 0, 0, 1, 2, 3, 4])
    assert d.draft(5, 3) == [0, 0, 1]  # never more than there is room for
    assert d.draft(6, 10) == []  # "3 4 5 6"... only "2 3 4" + 6 is new: nothing to copy
    d = Drafter([7, 1, 2, 3, 4, 9, 9, 5, 1, 2, 3, 4, 6, 6, 1, 2, 3])
    assert d.draft(4, 2) == [6, 6]  # "1 2 3 4": the latest of two equally long matches
    d = Drafter([7, 1, 2, 3, 4, 9, 9, 0, 2, 3, 4, 6, 6, 7, 1, 2, 3])
    assert d.draft(4, 2) == [9, 9]  # "7 1 2 3 4" (5 tokens) beats the later "2 3 4"+…


def test_the_draft_length_follows_acceptance() -> None:
    d = Drafter(list(range(100)) * 2)
    d.update(8, 8)
    d.update(16, 16)
    assert d.length == DRAFT_MAX
    d.update(32, 3)
    assert d.length == 4
    d.update(4, 0)  # a draft wholly rejected: drafting pauses
    assert d.length == 2
    assert [d.draft(0, 10) for _ in range(PAUSE_STEPS)] == [[]] * PAUSE_STEPS
    assert d.draft(0, 10) == [1, 2]  # "97 98 99 0" led to 1 2


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
