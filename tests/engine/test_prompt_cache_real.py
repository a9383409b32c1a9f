"""The prompt cache on the default model: a restored state answers as a decoded prompt does,
and it survives a real server restart; a damaged cache file costs only the decode."""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmscli.engine import LoadOptions, ModelSpec, PredictionRequest, SamplingParams, get_engine
from lmscli.engine.base import ModelInstance
from lmscli.engine.promptcache import PromptCache
from tests.conftest import ProcessServer, free_port, link_default_model, user_prompt
from tests.server.test_server_real import lms

pytestmark = pytest.mark.real


def facts(topic: str) -> str:
    return " ".join(f"Fact {i} about {topic}: item {i * 7 % 31} is painted shade {i * 3}."
                    for i in range(25))


@pytest.fixture(scope="module")
def one_slot(default_model_file: Path) -> Iterator[ModelInstance]:
    engine = get_engine("llama.cpp")
    engine.prompt_cache = PromptCache(2**28)
    spec = ModelSpec(path=str(default_model_file), model_key="smollm2-135m-instruct",
                     max_context_length=8192)
    # without drafting: a draft decodes tokens in batches, whose sums llama.cpp orders
    # differently at this length, and the test compares answers to the letter
    inst = engine.load(spec, LoadOptions(context_length=4096, parallel=1, speculative="off"))
    yield inst
    inst.close()


def answer(inst: ModelInstance, prompt: str) -> tuple[str, int]:
    events: queue.Queue = queue.Queue()
    inst.submit(PredictionRequest(prompt, SamplingParams(temperature=0, max_tokens=24)),
                events.put)
    text = []
    while True:
        event = events.get(timeout=120)
        if event.type == "fragment":
            text.append(event.text)
        elif event.type == "done":
            return "".join(text), event.stats.cached_tokens
        elif event.type == "failed":
            raise AssertionError(event.message)


def test_a_restored_prompt_answers_as_the_decoded_one_did(one_slot: ModelInstance) -> None:
    a = user_prompt(one_slot, facts("lighthouses") + " Which item is painted shade 9?")
    b = user_prompt(one_slot, facts("orchards") + " Which item is painted shade 12?")
    first, cached = answer(one_slot, a)
    assert cached == 0 and first
    answer(one_slot, b)  # takes the only slot: a's cache is saved, then cleared
    again, cached = answer(one_slot, a)
    assert cached == len(one_slot.tokenize(a, add_bos=False)) - 1
    assert again == first


def test_the_disk_cache_outlives_a_server_restart(home: Path, default_model_file: Path) -> None:
    link_default_model(home, default_model_file)
    # without drafting, whose batches llama.cpp sums differently: the answers are compared
    body = {"model": "smollm2-135m-instruct", "temperature": 0, "max_tokens": 16,
            "speculative": "off", "messages": [{"role": "system", "content": facts("railways")},
                         {"role": "user", "content": "Which item is painted shade 6?"}]}

    def serve_once() -> tuple[str, int, ProcessServer]:
        server = ProcessServer(home)
        try:
            server.load_default(2048)
            reply = httpx.post(server.base_url + "/v1/chat/completions", json=body,
                               timeout=120).json()
            status = httpx.get(server.base_url + "/lmscli/status", timeout=10).json()
            assert status["promptCache"]["diskDir"] == str(home / "prompt-cache")
        finally:
            server.stop()
        return (reply["choices"][0]["message"]["content"],
                reply["usage"]["prompt_tokens_details"]["cached_tokens"], server)

    text, cached, _ = serve_once()
    assert cached == 0
    assert list((home / "prompt-cache").glob("*.lmskv"))  # saved when the model unloaded
    again, cached, _ = serve_once()
    assert cached > 200 and again == text

    for path in (home / "prompt-cache").glob("*.lmskv"):  # damage every saved state
        raw = bytearray(path.read_bytes())
        raw[-100] ^= 0xFF
        path.write_bytes(bytes(raw))
    damaged, cached, server = serve_once()
    assert damaged == text and cached == 0
    assert "its contents are damaged" in (home / "server-test.log").read_text()


def test_the_cache_is_sized_at_start_and_shown_by_ps(home: Path, default_model_file: Path,
                                                     tmp_path: Path) -> None:
    r = lms(home, "server", "start", "--cache-ram", "lots")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "option '--cache-ram': 'lots' is not a size" in r.stderr
    link_default_model(home, default_model_file)
    port = str(free_port())
    r = lms(home, "server", "start", "-p", port, "--cache-ram", "64M", "--cache-disk", "0",
            "--cache-dir", str(tmp_path / "elsewhere"))
    assert r.returncode == 0, r.stderr
    try:
        assert lms(home, "load", "smollm2-135m-instruct", "-c", "1024", "-y").returncode == 0
        status = httpx.get(f"http://127.0.0.1:{port}/lmscli/status", timeout=10).json()
        assert status["promptCache"]["ramLimitBytes"] == 64 * 2**20
        assert status["promptCache"]["diskLimitBytes"] == 0
        assert status["promptCache"]["diskDir"] is None
        (model,) = json.loads(lms(home, "ps", "--json").stdout)
        assert {"entries", "hits", "misses", "restoredTokens", "ramBytes"} <= set(
            model["promptCache"])
    finally:
        lms(home, "server", "stop")
