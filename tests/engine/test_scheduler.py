"""The step scheduler on the fake engine: interleaving, queueing, slot choice, cancellation."""

from __future__ import annotations

import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lmscli.engine import (
    Done,
    Failed,
    Fragment,
    LoadOptions,
    ModelSpec,
    PredictionRequest,
    PromptProgress,
    QueueFull,
    SamplingParams,
)
from lmscli.engine.base import ModelInstance
from lmscli.engine.fake import DEFAULT_REPLY, FakeEngine
from tests.gguf_factory import make_gguf


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.gguf"
    make_gguf(path, name="Tiny", context_length=4096)
    return path


def load(model_file: Path, **options: int) -> ModelInstance:
    spec = ModelSpec(path=str(model_file), model_key="tiny", max_context_length=4096)
    return FakeEngine().load(spec, LoadOptions(**options))


@pytest.fixture
def engine4(model_file: Path) -> Iterator[ModelInstance]:
    inst = load(model_file, parallel=4)
    yield inst
    inst.close()


class Run:
    """One submitted prediction and the events it got, with the time of each."""

    log: list[tuple[float, str, object]]

    def __init__(self, inst: ModelInstance, prompt: str, name: str = "", **params: object
                 ) -> None:
        self.name = name
        self.events: queue.Queue = queue.Queue()
        self.seen: list[object] = []
        drafting = {k: params.pop(k) for k in ("speculative", "draft_max", "draft_min")
                    if k in params}
        self.prediction = inst.submit(PredictionRequest(
            prompt, SamplingParams(**params), **drafting),  # type: ignore[arg-type]
            self._put)

    def _put(self, event: object) -> None:
        self.seen.append((time.perf_counter(), event))
        self.events.put(event)

    def wait(self, timeout: float = 10) -> Done | Failed:
        while True:
            event = self.events.get(timeout=timeout)
            if isinstance(event, Done | Failed):
                return event

    @property
    def text(self) -> str:
        return "".join(e.text for _, e in self.seen if isinstance(e, Fragment))

    def first(self, kind: type) -> float:
        return next(t for t, e in self.seen if isinstance(e, kind))


def test_several_predictions_progress_together(engine4: ModelInstance) -> None:
    runs = [Run(engine4, f"[[slow]] [[count: 12]] q{i}") for i in range(3)]
    dones = [r.wait() for r in runs]
    assert all(d.stats.stop_reason == "eosFound" for d in dones)
    first_end = min(r.first(Done) for r in runs)
    # every stream had its first token long before any of them ended
    assert all(r.first(Fragment) < first_end - 0.2 for r in runs)
    assert [r.text for r in runs] == [" ".join(f"n{i}" for i in range(1, 13))] * 3


def test_one_slot_runs_them_in_turn_and_counts_the_queue(model_file: Path) -> None:
    inst = load(model_file, parallel=1)
    try:
        a = Run(inst, "[[slow]] [[count: 10]] a")
        b = Run(inst, "[[slow]] [[count: 2]] b")
        time.sleep(0.2)
        assert inst.queued == 1 and inst.active == 1
        a.wait(), b.wait()
        assert b.first(Fragment) > a.first(Done)
        assert inst.queued == 0 and inst.active == 0
    finally:
        inst.close()


def test_a_full_queue_refuses_more(model_file: Path) -> None:
    inst = load(model_file, parallel=1, max_queue=1)
    try:
        a = Run(inst, "[[slow]] [[count: 20]] a")
        b = Run(inst, "b")
        with pytest.raises(QueueFull):
            Run(inst, "c")
        a.prediction.cancel()
        assert a.wait().stats.stop_reason == "userStopped"
        assert b.wait().stats.stop_reason == "eosFound"
        assert Run(inst, "d").wait().stats.stop_reason == "eosFound"  # room again
    finally:
        inst.close()


def test_the_queue_bound_is_exact_while_slots_wait_for_room(model_file: Path) -> None:
    """Slots can be free while requests wait: the KV pool holds a long answer and none of
    theirs fits beside it. They count as waiting all the same (67 once waited with a queue
    of 64, the three free slots counted as places in it)."""
    inst = load(model_file, parallel=4, max_queue=5, context_length=64)
    try:
        long = Run(inst, "[[slow]] [[count: 40]] long", max_tokens=60)
        time.sleep(0.2)
        accepted, refused = [], 0
        for i in range(12):  # a flood: faster than the engine looks at each
            try:
                accepted.append(Run(inst, f"w{i}", max_tokens=60))
            except QueueFull:
                refused += 1
        time.sleep(0.2)
        assert inst.active == 1 and inst.queued == 5
        # those let in on the free slots' account are turned away once the engine looks
        turned_away = [r for r in accepted if r.seen and isinstance(r.seen[0][1], Failed)]
        assert all(r.seen[0][1].code == "queue_full" for r in turned_away)
        assert refused + len(turned_away) == 7
        with pytest.raises(QueueFull, match="5 requests are already waiting for tiny"):
            Run(inst, "one more", max_tokens=60)
        long.prediction.cancel()
        waiting = [r for r in accepted if r not in turned_away]
        assert [r.wait().stats.stop_reason for r in waiting] == ["eosFound"] * 5
    finally:
        inst.close()


def test_free_slots_take_requests_beyond_a_smaller_queue(model_file: Path) -> None:
    inst = load(model_file, parallel=4, max_queue=0)
    try:
        runs = [Run(inst, f"[[slow]] [[count: 20]] r{i}") for i in range(4)]
        time.sleep(0.2)
        with pytest.raises(QueueFull):
            Run(inst, "one too many")
        for r in runs:
            r.prediction.cancel()
            r.wait()
    finally:
        inst.close()


def test_short_request_starts_while_a_long_answer_streams(engine4: ModelInstance) -> None:
    long = Run(engine4, "[[slow]] [[count: 60]] long")
    time.sleep(0.3)
    short = Run(engine4, "[[count: 2]] short")
    short.wait()
    assert short.first(Fragment) - short.seen[0][0] < 0.5
    assert long.events.qsize() and not long.prediction.finished.is_set()
    long.prediction.cancel()
    long.wait()


def test_cancel_frees_the_slot_for_a_waiting_request(model_file: Path) -> None:
    inst = load(model_file, parallel=1)
    try:
        a = Run(inst, "[[slow]] [[count: 200]] a")
        b = Run(inst, "[[count: 3]] b")
        time.sleep(0.3)
        cancelled_at = time.perf_counter()
        a.prediction.cancel()
        assert a.wait().stats.stop_reason == "userStopped"
        assert b.wait().stats.stop_reason == "eosFound"
        assert b.first(Fragment) - cancelled_at < 0.3  # within a step or two
    finally:
        inst.close()


def chat(*turns: str) -> str:
    """A ChatML prompt of alternating user/assistant turns, ready for the next answer."""
    parts = []
    for i, text in enumerate(turns):
        role = "user" if i % 2 == 0 else "assistant"
        parts.append(f"<|im_start|>{role}\n{text}<|im_end|>\n")
    return "".join(parts) + "<|im_start|>assistant\n"


def test_two_alternating_chats_keep_their_caches(engine4: ModelInstance) -> None:
    a1 = "alpha " * 40 + "[[reply: the alpha answer]]"
    b1 = "beta " * 40 + "[[reply: the beta answer]]"
    Run(engine4, chat(a1)).wait()
    Run(engine4, chat(b1)).wait()
    a2 = Run(engine4, chat(a1, "the alpha answer", "and more [[reply: ok]]")).wait()
    b2 = Run(engine4, chat(b1, "the beta answer", "and more [[reply: ok]]")).wait()
    assert a2.stats.cached_tokens > 40 and b2.stats.cached_tokens > 40


def test_one_slot_loses_the_other_chat(model_file: Path) -> None:
    inst = load(model_file, parallel=1)
    try:
        a1 = "alpha " * 40
        Run(inst, chat(a1)).wait()
        Run(inst, chat("beta " * 40)).wait()
        again = Run(inst, chat(a1, DEFAULT_REPLY, "more")).wait()
        assert again.stats.cached_tokens < 10
    finally:
        inst.close()


def test_a_shared_prefix_is_copied_to_a_fresh_slot(engine4: ModelInstance) -> None:
    system = "<|im_start|>system\n" + "be brief " * 50 + "<|im_end|>\n"
    Run(engine4, system + chat("first question")).wait()
    other = Run(engine4, system + chat("a different question")).wait()
    assert other.stats.cached_tokens >= 100
    used = [s for s in engine4.slots if s.tokens]
    assert len(used) == 2  # the first chat's cache was not overwritten


def test_prompt_chunks_share_steps_with_generation(engine4: ModelInstance) -> None:
    gen = Run(engine4, "[[slow]] [[count: 40]] g")
    time.sleep(0.2)
    prompt = Run(engine4, "word " * 200 + "[[count: 1]]")
    prompt.wait()
    started, ended = prompt.first(PromptProgress), prompt.first(Fragment)
    during = [t for t, e in gen.seen if isinstance(e, Fragment) and started < t < ended]
    assert len(during) >= 3  # the stream kept going while the prompt was processed
    assert any(len(ids) == 2 for ids in engine4.backend.decoded_batches)  # one step, both
    gen.prediction.cancel()
    gen.wait()


def test_rejected_grammar_fails_only_its_request(engine4: ModelInstance) -> None:
    bad = PredictionRequest("x", SamplingParams(), grammar='root ::= "!invalid')
    events: queue.Queue = queue.Queue()
    engine4.submit(bad, events.put)
    good = Run(engine4, "[[reply: fine]]")
    failed = events.get(timeout=5)
    assert isinstance(failed, Failed) and failed.code == "grammar"
    assert good.wait().stats.stop_reason == "eosFound" and good.text == "fine"


def test_zero_max_tokens_gives_no_tokens(engine4: ModelInstance) -> None:
    run = Run(engine4, "[[reply: not this]]", max_tokens=0)
    done = run.wait()
    assert done.stats.stop_reason == "maxPredictedTokensReached"
    assert done.stats.predicted_tokens == 0 and run.text == ""


def test_unload_ends_running_and_waiting_predictions(model_file: Path) -> None:
    inst = load(model_file, parallel=1)
    a = Run(inst, "[[slow]] [[count: 100]] a")
    b = Run(inst, "b")
    time.sleep(0.2)
    inst.close()
    assert a.wait().stats.stop_reason == "modelUnloaded"
    assert b.wait().stats.stop_reason == "modelUnloaded"


def test_idle_caches_make_room_for_a_long_prompt(model_file: Path) -> None:
    inst = load(model_file, parallel=4, context_length=64)
    try:
        for i in range(4):
            Run(inst, f"chat {i} " + "w " * 8).wait()
        assert sum(len(s.tokens) for s in inst.slots) > 40
        done = Run(inst, "long " * 40 + "[[count: 5]]").wait()
        assert done.stats.stop_reason == "eosFound" and done.stats.predicted_tokens == 5
    finally:
        inst.close()


def test_a_full_pool_ends_the_longest_stream_not_the_server(model_file: Path) -> None:
    inst = load(model_file, parallel=2, context_length=64)
    try:
        a = Run(inst, "[[slow]] [[count: 50]] a")
        b = Run(inst, "[[slow]] [[count: 50]] b")
        reasons = sorted([a.wait().stats.stop_reason, b.wait().stats.stop_reason])
        assert "contextLengthReached" in reasons
        assert Run(inst, "[[count: 3]] after").wait().stats.stop_reason == "eosFound"
    finally:
        inst.close()


# -- embeddings share the step loop ---------------------------------------------------------

def test_a_long_embedding_never_stalls_a_prediction(engine4: ModelInstance) -> None:
    job = engine4.submit_embedding([f"[[slow]] text {i}" for i in range(60)])  # 3 s alone
    time.sleep(0.2)
    chat = Run(engine4, "[[count: 3]] hi")
    assert chat.wait().stats.stop_reason == "eosFound"
    # four steps (prompt, three tokens), one embedding input each: far from the 3 s
    assert chat.first(Done) - chat.seen[0][0] < 1.0
    assert not job.done.is_set()
    vectors = job.result()
    assert len(vectors) == 60 and vectors[0] == [float(len("[[slow]] text 0")), 3.0, 1.0]


def test_embeddings_take_turns_and_a_cancelled_one_stops(engine4: ModelInstance) -> None:
    long = engine4.submit_embedding(["[[slow]] a"] * 100)
    short = engine4.submit_embedding(["[[slow]] b"] * 3)
    assert len(short.result()) == 3 and not long.done.is_set()  # not behind all of long
    long.cancel()
    assert long.done.wait(1.0)
    with pytest.raises(RuntimeError, match="cancelled"):
        long.result()
    assert len(long.vectors) < 20


def test_an_input_the_model_refuses_fails_its_request_only(engine4: ModelInstance) -> None:
    bad = engine4.submit_embedding(["ok", "[[toolong]]", "never"])
    with pytest.raises(ValueError, match="Input 1"):
        bad.result()
    assert engine4.embed(["fine"]) == [[4.0, 1.0, 1.0]]


def test_waiting_embeddings_are_bounded(model_file: Path) -> None:
    inst = load(model_file, max_queue=2)
    try:
        jobs = [inst.submit_embedding(["[[slow]] x"] * 20) for _ in range(2)]
        with pytest.raises(QueueFull):
            inst.submit_embedding(["y"])
        for job in jobs:
            job.cancel()
            job.done.wait(2)
        assert inst.embed(["y"]) == [[1.0, 1.0, 1.0]]
    finally:
        inst.close()


def test_unloading_ends_waiting_embeddings(model_file: Path) -> None:
    inst = load(model_file)
    job = inst.submit_embedding(["[[slow]] x"] * 100)
    time.sleep(0.1)
    inst.close()
    with pytest.raises(RuntimeError, match="unloaded"):
        job.result()
