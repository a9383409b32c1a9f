"""The official ``lmstudio`` package (1.5.0) against a real lmscli server with the default
model: the docs' SDK examples with only the host set, model management, structured output,
embeddings, act() over several rounds, cancellation, concurrent clients and a client that
disconnects mid-prediction."""

from __future__ import annotations

import builtins
import itertools
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import lmstudio as lms
import pytest
from lmstudio.history import ToolCallRequest
from websockets.sync.client import connect

from tests.conftest import ProcessServer, link_default_model
from tests.doc_tools import add, docs_act_loop, docs_chat_loop, is_prime, multiply
from tests.server.test_tooluse_real import add_smol_qwen

pytestmark = [pytest.mark.real, pytest.mark.usefixtures("no_sdk_complaints")]
MODEL = "smollm2-135m-instruct"
QWEN = "smol-qwen"  # the default model with a Hermes/Qwen tool template: native <tool_call>


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           default_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("sdk-home")
    link_default_model(home, default_model_file)
    add_smol_qwen(home, default_model_file)
    server = ProcessServer(home)
    yield server
    server.stop()


@pytest.fixture
def host(server: ProcessServer) -> Iterator[str]:
    """The convenience API's default client, pointed at the server (the docs' one setting)."""
    from lmstudio import sync_api

    sync_api._reset_default_client()  # the SDK's own hook for test suites
    host = f"127.0.0.1:{server.port}"
    lms.configure_default_client(host)
    yield host
    sync_api._reset_default_client()


def only_loaded(context_length: int) -> None:
    """The default model alone, with a context that bounds the docs' examples: they set no
    token limit, and a small model can talk until its context is full."""
    for model in lms.list_loaded_models():
        if model.get_context_length() != context_length or model.identifier != MODEL:
            model.unload()
    lms.llm(MODEL, config={"contextLength": context_length})


@pytest.fixture
def chat_host(host: str) -> str:
    only_loaded(192)
    return host


@pytest.fixture
def act_host(host: str) -> str:
    only_loaded(1024)  # the tool prompts of the act() examples take 430 to 540 tokens
    return host


def loaded(server: ProcessServer) -> dict[str, dict[str, Any]]:
    return {e["identifier"]: e for e in
            httpx.get(server.base_url + "/lmscli/models/loaded").json()}


# -- the docs' examples (shared/seeds/000_…), as written --------------------------------------

def test_docs_chat_examples(chat_host: str, capsys: pytest.CaptureFixture[str],
                            monkeypatch: pytest.MonkeyPatch) -> None:
    model = lms.llm()
    print(model.respond("What is the meaning of life?"))
    for fragment in model.respond_stream("What is the meaning of life?"):
        print(fragment.content, end="", flush=True)
    print()
    out = capsys.readouterr().out
    assert out.count("\n") >= 2 and len(out.strip()) > 20

    chat = lms.Chat("You are a resident AI philosopher.")
    chat.add_user_message("What is the meaning of life?")
    result = model.respond(chat)
    print(result)
    prediction_stream = model.respond_stream(chat, config={
        "temperature": 0.6,
        "maxTokens": 50,
    })
    for _ in prediction_stream:
        pass
    result = prediction_stream.result()
    print("Model used:", result.model_info.display_name)
    print("Predicted tokens:", result.stats.predicted_tokens_count)
    print("Time to first token (seconds):", result.stats.time_to_first_token_sec)
    print("Stop reason:", result.stats.stop_reason)
    out = capsys.readouterr().out
    assert f"Model used: {result.model_info.display_name}\n" in out
    assert result.model_info.display_name.startswith("Smollm2 135M")
    assert 0 < result.stats.predicted_tokens_count <= 50
    assert result.stats.time_to_first_token_sec > 0
    assert result.stats.stop_reason in ("eosFound", "maxPredictedTokensReached")


def test_docs_multi_turn_chat(chat_host: str, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:
    answers = iter(["Hello! Who are you?", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    chat = docs_chat_loop(lms)
    reply = capsys.readouterr().out.partition("Bot: ")[2].strip()
    assert [m["role"] for m in chat._get_history()["messages"]] == \
        ["system", "user", "assistant"]
    assert chat._get_history()["messages"][-1]["content"][0]["text"].strip() == reply


def test_docs_progress_callbacks_in_order(chat_host: str) -> None:
    events: list[Any] = []
    llm = lms.llm()
    response = llm.respond(
        "What is LM Studio?",
        on_prompt_processing_progress=(lambda progress: events.append(f"{progress*100}% "
                                                                      "complete")),
        on_first_token=lambda: events.append("first token"),
        on_prediction_fragment=lambda fragment: events.append(fragment),
        on_message=lambda message: events.append(message),
        config={"maxTokens": 30, "temperature": 0},
    )
    first = events.index("first token")
    assert events[0] == "0.0% complete" and events[first - 1] == "100.0% complete"
    assert all(isinstance(e, str) and e.endswith("% complete") for e in events[:first])
    fragments = events[first + 1:-1]
    assert "".join(f.content for f in fragments) == response.content
    assert isinstance(events[-1], lms.history.AssistantResponse)
    assert events[-1].content[0].text == response.content


# -- the docs' act() examples (shared/seeds/004_…) ----------------------------------------------

def test_docs_act_examples(act_host: str, capsys: pytest.CaptureFixture[str]) -> None:
    model = lms.llm(MODEL)
    model.act(
        "What is the result of 12345 multiplied by 54321?",
        [multiply],
        on_message=print,
    )
    model.act(
        "Is the result of 12345 + 45668 a prime? Think step by step.",
        [add, is_prime],
        on_message=print,
    )
    assert capsys.readouterr().out.count("AssistantResponse") >= 2


def test_docs_create_file_chat_loop(act_host: str, monkeypatch: pytest.MonkeyPatch,
                                    tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    answers = iter(["Create a file named hello.txt that says hi", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))

    chat = docs_act_loop(lms)
    assert capsys.readouterr().out.startswith("Bot: ")
    roles = [m["role"] for m in chat._get_history()["messages"]]
    assert roles[:3] == ["system", "user", "assistant"] and roles[-1] == "assistant"


# -- model management ---------------------------------------------------------------------

def test_llm_key_loads_an_unloaded_model(server: ProcessServer) -> None:
    with lms.Client(f"127.0.0.1:{server.port}") as client:
        for model in client.list_loaded_models():
            model.unload()
        assert client.list_loaded_models() == []
        downloaded = {m.model_key: m for m in client.list_downloaded_models()}
        assert {MODEL, QWEN} <= set(downloaded)
        assert downloaded[MODEL].info.display_name.startswith("Smollm2 135M")
        progress: list[float] = []
        model = client.llm.model(MODEL, config={"contextLength": 2048},
                                 on_load_progress=progress.append)
        assert progress[0] == 0.0 and progress[-1] == 1.0 and len(progress) > 2
        assert client.list_loaded_models() == [model]
        info = model.get_info()
        assert (info.model_key, info.identifier, info.max_context_length) == (MODEL, MODEL,
                                                                              8192)
        assert model.get_context_length() == 2048
        assert loaded(server)[MODEL]["contextLength"] == 2048
        model.unload()
        assert client.list_loaded_models() == [] and loaded(server) == {}


def test_errors_come_back_as_the_sdk_exceptions(host: str) -> None:
    with pytest.raises(lms.LMStudioModelNotFoundError,
                       match=f'Model "no-such-model" not found. Available models: .*{MODEL}'):
        lms.llm("no-such-model")
    model = lms.llm(MODEL)
    with pytest.raises(lms.LMStudioServerError, match="'temperature' must be between 0 and 2"):
        model.respond("Hi", config={"temperature": 3.5})
    with pytest.raises(lms.LMStudioServerError, match="more than the model's context length"):
        model.respond("word " * 9000)  # past even the trained 8192 tokens
    assert model.respond("Hi", config={"maxTokens": 3}).content  # still serving


def test_structured_response(host: str) -> None:
    schema = {"type": "object", "properties": {"capital": {"type": "string", "maxLength": 20}},
              "required": ["capital"]}
    result = lms.llm(MODEL).respond("What is the capital of France?", response_format=schema,
                                    config={"temperature": 0, "maxTokens": 60})
    assert result.structured
    assert isinstance(result.parsed, dict) and isinstance(result.parsed["capital"], str)


def test_embedding_model(host: str) -> None:
    model = lms.embedding_model(MODEL)
    a, b = model.embed(["cats purr", "dogs bark"])
    assert len(a) == 576 and a != b
    assert model.embed("cats purr") == a


# -- act() over several rounds ------------------------------------------------------------

def primes_chat(question: str) -> lms.Chat:
    """Two worked examples in the history: a 135M model follows them call for call."""
    ids = itertools.count(1)
    chat = lms.Chat()
    for a, b in [(2, 3), (4, 5)]:
        total = a + b
        chat.add_user_message(f"Is {a} + {b} a prime?")
        for name, args, result in [("add", {"a": a, "b": b}, str(total)),
                                   ("is_prime", {"n": total}, json.dumps(is_prime(total)))]:
            request = ToolCallRequest(type="function", id=f"call_{next(ids)}", name=name,
                                      arguments=args)
            chat.add_assistant_response("", [request])
            chat.add_tool_results([{"toolCallId": request.id, "content": result}])
        verdict = "Yes" if is_prime(total) else "No"
        chat.add_assistant_response(f"{verdict}, {a} + {b} = {total}.")
    chat.add_user_message(question)
    return chat


def test_act_two_tools_over_several_rounds(host: str) -> None:
    events: list[Any] = []
    result = lms.llm(QWEN).act(
        primes_chat("Is 12345 + 45668 a prime?"), [add, is_prime],
        config={"temperature": 0, "maxTokens": 60},
        on_round_start=lambda i: events.append(("round_start", i)),
        on_round_end=lambda i: events.append(("round_end", i)),
        on_prediction_completed=lambda r: events.append(
            ("completed", r.round_index, r.stats.stop_reason)),
        on_message=lambda m: events.append(("message", m)))
    assert result.rounds == 3
    replies = [e[1] for e in events
               if e[0] == "message" and isinstance(e[1], lms.history.AssistantResponse)]
    assert [part.tool_call_request.name for m in replies for part in m.content[1:]] == \
        ["add", "is_prime"]
    flow = [(e[0], type(e[1]).__name__) if e[0] == "message" else e for e in events]
    stop = events[11][-1]  # round 2's answer may fill its 60 tokens
    assert stop in ("eosFound", "maxPredictedTokensReached")
    assert flow == [
        ("round_start", 0), ("completed", 0, "toolCalls"), ("message", "AssistantResponse"),
        ("message", "ToolResultMessage"), ("round_end", 0),
        ("round_start", 1), ("completed", 1, "toolCalls"), ("message", "AssistantResponse"),
        ("message", "ToolResultMessage"), ("round_end", 1),
        ("round_start", 2), ("completed", 2, stop), ("message", "AssistantResponse"),
        ("round_end", 2)]


# -- cancellation, concurrency, disconnects ------------------------------------------------

def test_cancel_mid_reply(host: str) -> None:
    stream = lms.llm(MODEL).respond_stream("Write a long story about a dragon.",
                                           config={"maxTokens": 400, "temperature": 0})
    for seen, _ in enumerate(stream, 1):
        if seen == 5:
            stream.cancel()
    result = stream.result()
    assert result.stats.stop_reason == "userStopped"
    assert result.stats.predicted_tokens_count < 100


def test_several_clients_at_once(server: ProcessServer, host: str) -> None:
    results: dict[int, lms.PredictionResult] = {}

    def ask(i: int) -> None:
        with lms.Client(f"127.0.0.1:{server.port}") as client:
            results[i] = client.llm.model(MODEL).respond(
                f"Count from {i} to {i + 5}.", config={"maxTokens": 20, "temperature": 0})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(results) == [0, 1, 2]
    assert all(r.content and 0 < r.stats.predicted_tokens_count <= 20
               for r in results.values())


def test_disconnect_mid_prediction_frees_the_slot(server: ProcessServer, host: str) -> None:
    lms.llm(MODEL)
    with connect(f"ws://127.0.0.1:{server.port}/llm") as ws:
        ws.send(json.dumps({"authVersion": 1, "clientIdentifier": "x", "clientPasskey": "y"}))
        assert json.loads(ws.recv(timeout=10)) == {"success": True}
        ws.send(json.dumps({"type": "channelCreate", "endpoint": "predict", "channelId": 1,
                            "creationParameter": {
                                "modelSpecifier": {"type": "query",
                                                   "query": {"identifier": MODEL}},
                                "history": {"messages": [{"role": "user", "content": [
                                    {"type": "text", "text": "Tell me a very long story."}]}]},
                                "predictionConfigStack": {"layers": [{
                                    "layerName": "apiOverride", "config": {"fields": [{
                                        "key": "llm.prediction.maxPredictedTokens",
                                        "value": {"checked": True, "value": 900}}]}}]}}}))
        while json.loads(ws.recv(timeout=30))["message"]["type"] != "fragment":
            pass
        assert loaded(server)[MODEL]["status"] == "generating"
    deadline = time.monotonic() + 10
    while loaded(server)[MODEL]["status"] != "idle" and time.monotonic() < deadline:
        time.sleep(0.05)
    entry = loaded(server)[MODEL]
    assert (entry["status"], entry["queued"]) == ("idle", 0)
    # the output log shows the prediction stopped early, not after 900 tokens
    assert lms.llm(MODEL).respond("Hi", config={"maxTokens": 5}).content


# -- finding the server --------------------------------------------------------------------

def test_client_without_a_host_finds_the_server(server: ProcessServer) -> None:
    status = httpx.get(server.base_url + "/lmscli/status").json()
    sdk_port = status["sdkPort"]
    assert sdk_port in lms.Client._DEFAULT_API_PORTS
    # the SDK takes the first of its ports that answers the greeting: ours, unless another
    # server on this machine holds an earlier one
    first = next(p for p in lms.Client._DEFAULT_API_PORTS
                 if lms.Client.is_valid_api_host(f"127.0.0.1:{p}"))
    with lms.Client() as client:
        assert client.api_host == f"127.0.0.1:{first}"
        if first == sdk_port:
            assert MODEL in {m.model_key for m in client.list_downloaded_models()}
