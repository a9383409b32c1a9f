"""Issue 9 over real HTTP with the fake engine: requests that once froze the server, kept
it generating for nobody, or got a 500, and what they get now."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmscli.engine.fake import FakeEngine
from lmscli.server import models as models_module
from lmscli.server.models import kv_bytes_per_token
from lmscli.server.pipeline import local as pipeline
from lmscli.server.pipeline import tooluse
from tests.conftest import ThreadServer
from tests.gguf_factory import make_gguf

LOOPING_TEMPLATE = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}never")
USER = [{"role": "user", "content": "hi"}]


def post(server: ThreadServer, path: str, body: Any = None, *, raw: bytes | None = None,
         timeout: float = 30) -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.base_url + path, content=content, timeout=timeout,
                      headers={"Content-Type": "application/json"})


def chat(server: ThreadServer, **extra: Any) -> httpx.Response:
    return post(server, "/v1/chat/completions",
                {"model": "tiny-chat", "messages": USER} | extra)


def loaded(server: ThreadServer) -> list[dict[str, Any]]:
    return httpx.get(server.base_url + "/lmscli/models/loaded").json()


# -- freezes ---------------------------------------------------------------------------------

@pytest.fixture
def looping_server(fake_models: Path, monkeypatch: pytest.MonkeyPatch
                   ) -> Iterator[ThreadServer]:
    """A server with loop-chat, whose template loops, and a 1 s render budget."""
    make_gguf(fake_models / "test/loop-chat-GGUF/loop-chat.Q4_0.gguf", context_length=256,
              chat_template=LOOPING_TEMPLATE)
    monkeypatch.setattr(tooluse, "TEMPLATE_BUDGET_S", 1.0)
    server = ThreadServer(FakeEngine())
    yield server
    server.stop()


def test_a_looping_template_is_a_400_while_health_checks_answer(
        looping_server: ThreadServer) -> None:
    server = looping_server
    answer: list[httpx.Response] = []
    started = time.monotonic()
    worker = threading.Thread(target=lambda: answer.append(post(
        server, "/v1/chat/completions", {"model": "loop-chat", "messages": USER})))
    worker.start()
    slowest = 0.0
    while worker.is_alive():
        t = time.monotonic()
        assert httpx.get(server.base_url + "/lmstudio-greeting", timeout=5).status_code == 200
        slowest = max(slowest, time.monotonic() - t)
        time.sleep(0.05)
    took = time.monotonic() - started
    assert slowest < 0.5, f"a health check waited {slowest:.2f}s"
    assert answer[0].status_code == 400
    assert answer[0].json()["error"]["code"] == "template_error"
    assert 0.9 < took < 4
    assert chat(server).status_code == 200  # other models are unaffected


def test_a_looping_template_holds_up_only_its_own_model(looping_server: ThreadServer) -> None:
    # renders share the interpreter: twelve looping ones once made every other model's
    # chats wait behind them, then fail with the same 400
    server = looping_server
    assert chat(server).status_code == 200  # tiny-chat loaded: its latency is a chat's
    hostile: list[httpx.Response] = []
    workers = [threading.Thread(target=lambda: hostile.append(post(
        server, "/v1/chat/completions", {"model": "loop-chat", "messages": USER})))
        for _ in range(12)]
    for worker in workers:
        worker.start()
    healthy: list[tuple[int, float]] = []
    while any(worker.is_alive() for worker in workers):
        started = time.monotonic()
        status = chat(server, max_tokens=4).status_code
        healthy.append((status, time.monotonic() - started))
    assert len(healthy) >= 3
    assert {status for status, _ in healthy} == {200}
    slowest = max(took for _, took in healthy)  # alone: 0.05 s; once: 2.5 s, or a 400
    assert slowest < 1.0, f"a healthy chat took {slowest:.2f}s"
    assert [r.status_code for r in hostile] == [400] * 12
    assert {r.json()["error"]["code"] for r in hostile} == {"template_error"}


def test_an_abandoned_non_streamed_request_stops_generating(fake_server: ThreadServer) -> None:
    # 200 slow tokens: ten seconds of generation if nobody stops it
    with pytest.raises(httpx.ReadTimeout):
        post(fake_server, "/v1/chat/completions", {"model": "tiny-chat", "messages": [
            {"role": "user", "content": "[[slow]] [[count: 200]]"}]}, timeout=0.5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and loaded(fake_server)[0]["status"] != "idle":
        time.sleep(0.05)
    assert loaded(fake_server)[0]["status"] == "idle"
    started = time.monotonic()
    assert chat(fake_server).status_code == 200
    assert time.monotonic() - started < 2


# -- grammars the engine rejects ---------------------------------------------------------------

def schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}


def test_a_grammar_the_engine_rejects_is_a_400(fake_server: ThreadServer) -> None:
    # the fake engine rejects any grammar with "!invalid" in it, as llama.cpp rejects some
    r = chat(fake_server, response_format=schema_format({"const": "!invalid"}))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_grammar"
    r = chat(fake_server, tools=[{"type": "function", "function": {"name": "!invalid"}}],
             tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert chat(fake_server).status_code == 200


def test_an_engine_failure_on_the_grammar_is_a_400_too(fake_server: ThreadServer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    async def no_check(*args: Any) -> None:
        return None

    monkeypatch.setattr(pipeline, "check_grammar", no_check)
    r = chat(fake_server, response_format=schema_format({"const": "!invalid"}))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "invalid_grammar"


def test_schema_problems_name_the_field(fake_server: ThreadServer) -> None:
    r = chat(fake_server, response_format=schema_format(
        {"type": "object", "properties": {"a": {"anyOf": []}}}))
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "invalid_schema"
    assert "response_format.json_schema.schema.properties.a.anyOf" in error["message"]
    r = chat(fake_server, tools=[{"type": "function", "function": {
        "name": "t", "parameters": {"type": "string", "pattern": "(?<=x)y"}}}],
        tool_choice={"type": "function", "function": {"name": "t"}})
    assert r.status_code == 400
    assert "tools[0].function.parameters.pattern" in r.json()["error"]["message"]


# -- loads -----------------------------------------------------------------------------------

def load(server: ThreadServer, **body: Any) -> httpx.Response:
    return post(server, "/lmscli/models/load", {"model": "tiny-chat"} | body)


@pytest.mark.parametrize("identifier", ["", "   ", "x" * 257, "new\nline", "nul\x00",
                                        "x\u2028y"])
def test_bad_identifiers_are_refused(fake_server: ThreadServer, identifier: str) -> None:
    r = load(fake_server, identifier=identifier)
    assert r.status_code == 400 and r.json()["error"]["param"] == "identifier"
    assert loaded(fake_server) == []


@pytest.mark.parametrize(("identifier", "instead"), [("a/b", "a-b"), ("x..y", "x.y"),
                                                   ("../up", ".-up")])
def test_identifiers_that_read_as_a_linked_model_are_refused(
        fake_server: ThreadServer, identifier: str, instead: str) -> None:
    """``LINK/model`` names a linked model: a local "a/b" would shadow link a's model b."""
    r = load(fake_server, identifier=identifier)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_identifier"
    assert r.json()["error"]["message"] == (
        f"Invalid identifier {identifier!r}: '/' and '..' are kept for linked models "
        f"(LINK/model). Use another, such as {instead!r}.")
    assert loaded(fake_server) == []
    assert load(fake_server, identifier="a.b-c").status_code == 200


def test_a_lone_surrogate_identifier_is_refused_and_listings_work(
        fake_server: ThreadServer) -> None:
    r = post(fake_server, "/lmscli/models/load",
             raw=b'{"model": "tiny-chat", "identifier": "x\\ud800"}')
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    assert load(fake_server, identifier="fine name · ok").status_code == 200
    assert [m["identifier"] for m in loaded(fake_server)] == ["fine name · ok"]
    assert httpx.get(fake_server.base_url + "/v1/models").status_code == 200


def test_context_length_is_bounded_by_the_trained_one(fake_server: ThreadServer) -> None:
    r = load(fake_server, context_length=257)  # tiny-chat was trained for 256
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_too_large"
    assert "256" in r.json()["error"]["message"]
    assert load(fake_server, context_length=256).status_code == 200
    assert loaded(fake_server)[0]["contextLength"] == 256


def test_a_load_that_needs_more_memory_than_is_free_is_refused(
        fake_server: ThreadServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_module, "mem_available", lambda: 1024)
    r = load(fake_server)
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "insufficient_memory"
    assert "GiB" in r.json()["error"]["message"]
    assert chat(fake_server).status_code == 400  # a JIT load is checked the same way
    assert loaded(fake_server) == []


def test_the_kv_estimate_follows_the_gguf_metadata() -> None:
    smollm2 = {"general.architecture": "llama", "llama.block_count": 30,
               "llama.embedding_length": 576, "llama.attention.head_count": 9,
               "llama.attention.head_count_kv": 3}
    # 30 layers x 3 KV heads x (64 + 64) dims x 2 bytes
    assert kv_bytes_per_token(smollm2) == 23040
    assert kv_bytes_per_token({"general.architecture": "llama"}) == 0


# -- values that got 500s ----------------------------------------------------------------------

@pytest.mark.parametrize(("raw", "needle"), [
    (b'{"model": "tiny-chat", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
     "nested too deeply"),
    (b'{"model": "tiny-chat", "max_tokens": ' + b"9" * 5000 + b"}", "not valid JSON"),
    (b'{"model": "tiny-chat", "temperature": NaN}', "not valid JSON"),
    (b'{"model": "\xed\xa0\x80"}', "not valid UTF-8"),
    (b'{"model": "tiny-chat", "x\\udfff": 1}', "surrogate"),
    (b'{"model": "tiny-chat", "messages": [{"role": "user", "content": "\\ud800"}]}',
     "messages[0].content"),
])
def test_malformed_json_is_a_400_that_says_why(fake_server: ThreadServer, raw: bytes,
                                               needle: str) -> None:
    r = post(fake_server, "/v1/chat/completions", raw=raw)
    assert r.status_code == 400
    assert needle in r.json()["error"]["message"]


def test_a_byte_order_mark_and_surrogate_pairs_are_fine(fake_server: ThreadServer) -> None:
    body = '{"model": "tiny-chat", "messages": [{"role": "user", ' \
           '"content": "[[reply: \\ud83d\\ude00]]"}]}'
    r = post(fake_server, "/v1/chat/completions", raw=b"\xef\xbb\xbf" + body.encode())
    assert r.status_code == 200
    assert r.json()["choices"][0]["message"]["content"] == "😀"


@pytest.mark.parametrize("extra", [{"temperature": 1e308 * 10}, {"top_p": -1e400},
                                   {"ttl": 10**400}, {"repeat_penalty": 10**400},
                                   {"max_tokens": 0}, {"seed": 2**64}, {"logprobs": True},
                                   {"logit_bias": {"1": 1}}, {"stop": ["s"] * 33},
                                   {"presence_penalty": 2.5}, {"frequency_penalty": "1"}])
def test_extreme_or_unsupported_values_are_400s(fake_server: ThreadServer,
                                                extra: dict[str, Any]) -> None:
    text = json.dumps({"model": "tiny-chat", "messages": USER} | extra)
    r = post(fake_server, "/v1/chat/completions", raw=text.replace("Infinity", "1e400").encode())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == next(iter(extra))


def test_max_tokens_one_gives_one_token(fake_server: ThreadServer) -> None:
    r = chat(fake_server, max_tokens=1)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 1


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": [""]}, "prompt"),
    ("/v1/embeddings", {"input": ""}, "input"),
    ("/v1/embeddings", {"input": []}, "input"),
    ("/v1/embeddings", {"input": ["a", ""]}, "input[1]"),
    ("/v1/embeddings", {"input": [[1, 2]]}, "input[0]"),
])
def test_empty_inputs_are_400s(fake_server: ThreadServer, path: str, body: dict[str, Any],
                               param: str) -> None:
    r = post(fake_server, path, {"model": "tiny-chat"} | body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param


def test_an_unknown_model_is_echoed_shortened(fake_server: ThreadServer) -> None:
    for name in ["x" * 50_000, "nul\x00byte", "~\x00"]:
        r = chat(fake_server, model=name)
        assert r.status_code == 404
        assert len(r.json()["error"]["message"]) < 1000
    r = httpx.get(fake_server.base_url + "/api/v0/models/" + "y" * 5000)
    assert r.status_code == 404 and len(r.json()["error"]["message"]) < 300
