"""Several predictions at once on llama.cpp with the default model: one batch, own settings."""

from __future__ import annotations

import json
import math
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from lmscli.engine import (
    Done,
    Failed,
    Fragment,
    PredictionRequest,
    PromptProgress,
    SamplingParams,
)
from lmscli.engine.base import ModelInstance
from tests.conftest import ProcessServer, load_default_model, user_prompt

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def instance(default_model_file: Path) -> Iterator[ModelInstance]:
    inst = load_default_model(default_model_file, parallel=4)
    yield inst
    inst.close()


class Stream:
    def __init__(self, inst: ModelInstance, text: str, grammar: str | None = None,
                 **params: object) -> None:
        self.times: list[float] = []
        self.texts: list[str] = []
        self.end: queue.Queue = queue.Queue()
        self.admitted: float | None = None  # when it got a slot (its first progress event)
        request = PredictionRequest(user_prompt(inst, text), SamplingParams(**params), grammar)
        self.prediction = inst.submit(request, self._put)

    def _put(self, event: object) -> None:
        if isinstance(event, PromptProgress) and self.admitted is None:
            self.admitted = time.perf_counter()
        if isinstance(event, Fragment):
            self.times.append(time.perf_counter())
            self.texts.append(event.text)
        elif isinstance(event, Done | Failed):
            self.times.append(time.perf_counter())
            self.end.put(event)

    def wait(self) -> Done:
        event = self.end.get(timeout=120)
        assert isinstance(event, Done), event
        return event

    @property
    def text(self) -> str:
        return "".join(self.texts)


def test_four_streams_decode_together(instance: ModelInstance) -> None:
    topics = ["the sea", "a forest", "the moon", "a city"]
    streams = [Stream(instance, f"Write a long story about {t}.", temperature=0.7, seed=i,
                      max_tokens=48) for i, t in enumerate(topics)]
    dones = [s.wait() for s in streams]
    assert all(0 < d.stats.predicted_tokens <= 48 for d in dones)
    first_end = min(s.times[-1] for s in streams)
    assert all(s.times[0] < first_end for s in streams)  # all started before any ended
    assert len({s.text for s in streams}) == 4 and all(s.text.strip() for s in streams)


def test_grammar_and_seed_stay_with_their_own_request(instance: ModelInstance) -> None:
    free = Stream(instance, "Tell me about cats.", temperature=1.0, seed=3, max_tokens=24)
    yes_no = Stream(instance, "Is water wet? Answer yes or no.", grammar='root ::= "yes" | "no"',
                    temperature=0.8, max_tokens=8)
    again = Stream(instance, "Tell me about cats.", temperature=1.0, seed=3, max_tokens=24)
    free.wait(), yes_no.wait(), again.wait()
    assert yes_no.text in ("yes", "no")
    assert len(free.text.split()) > 5  # the grammar did not leak into the others
    assert again.text.strip() and free.text.strip()


def test_short_request_is_answered_while_a_long_one_streams(instance: ModelInstance) -> None:
    long = Stream(instance, "Write a very long essay about the history of Rome.",
                  temperature=0, max_tokens=300)
    while len(long.times) < 5:
        time.sleep(0.01)
    sent = time.perf_counter()
    short = Stream(instance, "Say hi.", temperature=0, max_tokens=4)
    short.wait()
    assert short.times[0] - sent < 1.0
    assert not long.prediction.finished.is_set()
    long.prediction.cancel()
    assert long.wait().stats.stop_reason == "userStopped"


def test_cancel_frees_a_slot_within_a_step(instance: ModelInstance) -> None:
    # a grammar with no end: the four run until cancelled, whatever the model would say
    endless = 'root ::= [0-9]+ ", " root'
    streams = [Stream(instance, f"Count slowly to one hundred, version {i}.", endless,
                      temperature=0, max_tokens=400) for i in range(4)]
    while any(len(s.times) < 2 for s in streams):
        time.sleep(0.01)
    waiting = Stream(instance, "Say yes.", temperature=0, max_tokens=3)
    time.sleep(0.2)
    assert instance.queued == 1
    cancelled = time.perf_counter()
    streams[0].prediction.cancel()
    waiting.wait()
    assert waiting.admitted is not None and waiting.admitted - cancelled < 1.0
    for s in streams:
        s.prediction.cancel()
        s.wait()


def test_embeddings_of_a_chat_model_while_it_generates(instance: ModelInstance) -> None:
    busy = Stream(instance, "Write a story.", temperature=0, max_tokens=64)
    result: list[list[list[float]]] = []
    worker = threading.Thread(target=lambda: result.append(
        instance.embed(["the cat sat", "the cat sat", "quantum field theory"])))
    worker.start()
    worker.join(timeout=60)
    busy.wait()
    a, b, c = result[0]
    assert len(a) == 576  # SmolLM2-135M's embedding width
    assert math.isclose(sum(x * x for x in a), 1.0, rel_tol=1e-3)
    assert sum(x * y for x, y in zip(a, b, strict=True)) > 0.999
    assert sum(x * y for x, y in zip(a, c, strict=True)) < 0.99
    assert busy.text.strip()


# -- through the server, with the OpenAI SDK --------------------------------------------------

def ask(server: ProcessServer, messages: list[dict], max_tokens: int = 16) -> object:
    client = OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(model="smollm2-135m-instruct", messages=messages,
                                          max_tokens=max_tokens, temperature=0)


def test_alternating_chats_keep_their_caches(real_server: ProcessServer) -> None:
    a = [{"role": "user", "content": "Tell me about the history of bread. " * 10}]
    b = [{"role": "user", "content": "Explain how rainbows form in the sky. " * 10}]
    first_a, first_b = ask(real_server, a), ask(real_server, b)
    a += [{"role": "assistant", "content": first_a.choices[0].message.content},
          {"role": "user", "content": "Shorter please."}]
    b += [{"role": "assistant", "content": first_b.choices[0].message.content},
          {"role": "user", "content": "Shorter please."}]
    for history, first in ((a, first_a), (b, first_b)):
        usage = ask(real_server, history).usage
        assert usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1


def test_concurrent_streams_through_the_server(real_server: ProcessServer) -> None:
    client = OpenAI(base_url=real_server.base_url + "/v1", api_key="x", max_retries=0)
    firsts: dict[int, float] = {}
    ends: list[float] = []

    together = threading.Barrier(4)

    def one(i: int) -> None:
        together.wait()
        stream = client.chat.completions.create(
            model="smollm2-135m-instruct", max_tokens=120, temperature=0.5, seed=i,
            stream=True, messages=[{"role": "user", "content": f"Write a long story, number {i}."}])
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                firsts.setdefault(i, time.perf_counter())
        ends.append(time.perf_counter())

    threads = [threading.Thread(target=one, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(ends) == 4
    assert len(firsts) == 4 and max(firsts.values()) < min(ends)  # all started, then ends
    listing = json.loads(real_server.lms("ps", "--json").stdout)
    assert listing[0]["parallel"] == 4 and listing[0]["queued"] == 0
