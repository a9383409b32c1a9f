"""The official ``lmstudio`` package against lmscli's SDK websockets, on the fake engine; and
the protocol itself, frame by frame, where the package would hide what the server sent."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import lmstudio
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from lmscli.engine.fake import DEFAULT_REPLY, FakeBackend, FakeEngine, FakeSampler
from lmscli.prompting.tools import RESULT_CLOSE
from tests.conftest import ThreadServer

AUTH = {"authVersion": 1, "clientIdentifier": "test-client", "clientPasskey": "secret"}
QUERY = {"type": "query", "query": {"identifier": "tiny-chat"}}
pytestmark = pytest.mark.usefixtures("no_sdk_complaints")


def client(server: ThreadServer) -> lmstudio.Client:
    return lmstudio.Client(f"127.0.0.1:{server.port}")


@pytest.fixture
def sdk(fake_server: ThreadServer) -> Iterator[lmstudio.Client]:
    with client(fake_server) as c:
        yield c


@contextmanager
def raw(server: ThreadServer, namespace: str = "llm", auth: dict | None = AUTH,
        **kwargs: Any) -> Iterator[ClientConnection]:
    with connect(f"ws://127.0.0.1:{server.port}/{namespace}", **kwargs) as ws:
        if auth is not None:
            ws.send(json.dumps(auth))
            assert json.loads(ws.recv(timeout=5)) == {"success": True}
        yield ws


def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=10))


def predict_message(text: str, channel_id: int = 1, **config: Any) -> str:
    fields = [{"key": f"llm.prediction.{k}", "value": v} for k, v in config.items()]
    return json.dumps({"type": "channelCreate", "endpoint": "predict", "channelId": channel_id,
                       "creationParameter": {
                           "modelSpecifier": QUERY,
                           "history": {"messages": [{"role": "user", "content": [
                               {"type": "text", "text": text}]}]},
                           "predictionConfigStack": {"layers": [
                               {"layerName": "apiOverride", "config": {"fields": fields}}]}}})


# -- models ---------------------------------------------------------------------------------

def test_load_list_info_and_unload(sdk: lmstudio.Client) -> None:
    downloaded = {m.model_key: m for m in sdk.list_downloaded_models()}
    assert set(downloaded) == {"tiny-chat", "tiny-chat-large", "other-model"}
    assert downloaded["tiny-chat"].type == "llm"
    assert downloaded["tiny-chat"].info.max_context_length == 256
    progress: list[float] = []
    model = sdk.llm.model("tiny-chat", config={"contextLength": 128},
                          on_load_progress=progress.append)
    assert progress[0] == 0.0 and progress[-1] == 1.0 and progress == sorted(progress)
    info = model.get_info()
    assert (info.identifier, info.model_key, info.context_length) == ("tiny-chat", "tiny-chat",
                                                                       128)
    assert model.get_context_length() == 128
    assert model.get_load_config().context_length == 128
    assert sdk.list_loaded_models() == [model]
    again = sdk.llm.model("tiny-chat")  # already loaded: the same instance, no second load
    assert again == model and len(sdk.llm.list_loaded()) == 1
    second = sdk.llm.load_new_instance("tiny-chat", "second-one")
    assert second.identifier == "second-one"
    assert [m.identifier for m in sdk.llm.list_loaded()] == ["tiny-chat", "second-one"]
    model.unload()
    second.unload()
    assert sdk.list_loaded_models() == []


def test_llm_without_a_key_takes_the_loaded_model(sdk: lmstudio.Client) -> None:
    with pytest.raises(lmstudio.LMStudioClientError, match="no models are currently loaded"):
        sdk.llm.model()
    sdk.llm.model("tiny-chat-large")
    assert sdk.llm.model().identifier == "tiny-chat-large"


def test_not_found_errors_carry_lmscli_messages(sdk: lmstudio.Client) -> None:
    with pytest.raises(lmstudio.LMStudioModelNotFoundError,
                       match='Model "nope" not found. Available models: '):
        sdk.llm.model("nope")
    with pytest.raises(lmstudio.LMStudioModelNotFoundError, match='No loaded model matches'):
        sdk.llm.get_model_info("tiny-chat")
    with pytest.raises(lmstudio.LMStudioModelNotFoundError,
                       match='No model with identifier "ghost" is loaded'):
        sdk.llm.unload("ghost")
    with pytest.raises(lmstudio.LMStudioServerError, match="already loaded"):
        sdk.llm.load_new_instance("tiny-chat", "twice")
        sdk.llm.load_new_instance("tiny-chat", "twice")


def test_two_clients_asking_for_one_model_load_it_once(fake_server: ThreadServer) -> None:
    handles: list[str] = []

    def get() -> None:
        with client(fake_server) as c:
            handles.append(c.llm.model("tiny-chat").identifier)

    threads = [threading.Thread(target=get) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert handles == ["tiny-chat"] * 3
    assert list(fake_server.models.loaded) == ["tiny-chat"]


def test_embedding_namespace_embeds_with_a_chat_model(sdk: lmstudio.Client) -> None:
    model = sdk.embedding.model("tiny-chat")
    assert model.embed("two words") == [9.0, 2.0, 1.0]
    assert model.embed(["a", "b c"]) == [[1.0, 1.0, 1.0], [3.0, 2.0, 1.0]]
    assert model.get_info().identifier == "tiny-chat"
    # listed where it is an LLM, not twice
    assert [m.identifier for m in sdk.list_loaded_models()] == ["tiny-chat"]
    with pytest.raises(lmstudio.LMStudioServerError, match="must not be empty"):
        model.embed("")


def test_tokenize_and_template(sdk: lmstudio.Client) -> None:
    model = sdk.llm.model("tiny-chat")
    assert model.count_tokens("one two three") == 3
    assert len(model.tokenize(["a b", "c"])) == 2
    formatted = model.apply_prompt_template(lmstudio.Chat.from_history("Hi there"))
    assert "Hi there" in formatted and formatted.endswith("assistant\n")


# -- predictions ----------------------------------------------------------------------------

def test_respond_callbacks_in_documented_order(sdk: lmstudio.Client) -> None:
    model = sdk.llm.model("tiny-chat")
    events: list[Any] = []
    chat = lmstudio.Chat("You are a test.")
    chat.add_user_message("[[count: 6]]")
    result = model.respond(
        chat, config={"temperature": 0, "maxTokens": 50},
        on_prompt_processing_progress=lambda p: events.append(("progress", p)),
        on_first_token=lambda: events.append(("first",)),
        on_prediction_fragment=lambda f: events.append(("fragment", f.content)),
        on_message=lambda m: events.append(("message", m.role)))
    kinds = [e[0] for e in events]
    first = kinds.index("first")
    assert events[0] == ("progress", 0.0) and events[first - 1] == ("progress", 1.0)
    assert set(kinds[:first]) == {"progress"} and kinds[-1] == "message"
    assert "".join(e[1] for e in events if e[0] == "fragment") == result.content
    assert result.content == "n1 n2 n3 n4 n5 n6"
    assert result.stats.stop_reason == "eosFound"
    assert result.stats.predicted_tokens_count == 6
    assert result.model_info.model_key == "tiny-chat"
    assert result.prediction_config.temperature == 0
    assert result.prediction_config.max_tokens == 50
    assert result.load_config.context_length == 256


def test_config_limits_and_stop_strings(sdk: lmstudio.Client) -> None:
    model = sdk.llm.model("tiny-chat")
    capped = model.respond("[[count: 20]]", config={"maxTokens": 3})
    assert capped.content == "n1 n2 n3 " and \
        capped.stats.stop_reason == "maxPredictedTokensReached"
    stopped = model.respond("[[count: 20]]", config={"stopStrings": ["n4"]})
    assert stopped.content == "n1 n2 n3 " and stopped.stats.stop_reason == "stopStringFound"


def test_sampling_config_reaches_the_engine(sdk: lmstudio.Client) -> None:
    result = sdk.llm.model("tiny-chat").respond("hi", config={
        "topKSampling": 20, "topPSampling": 0.5, "minPSampling": 0.1, "repeatPenalty": 1.2,
        "temperature": 0.3})
    # predictionConfig reports the settings the prediction ran with
    config = result.prediction_config
    assert (config.top_k_sampling, config.top_p_sampling, config.min_p_sampling,
            config.repeat_penalty, config.temperature) == (20, 0.5, 0.1, 1.2, 0.3)
    off = sdk.llm.model("tiny-chat").respond("hi", config={"repeatPenalty": False,
                                                           "maxTokens": False})
    assert off.prediction_config.repeat_penalty == 1.0  # off: no penalty
    assert off.prediction_config.max_tokens is None


def test_bad_config_is_an_error_naming_the_field(sdk: lmstudio.Client) -> None:
    model = sdk.llm.model("tiny-chat")
    with pytest.raises(lmstudio.LMStudioServerError, match="'temperature' must be between"):
        model.respond("hi", config={"temperature": 5})
    with pytest.raises(lmstudio.LMStudioServerError, match="raw GBNF grammars are not"):
        model.respond("hi", response_format={"type": "gbnf", "gbnfGrammar": 'root ::= "a"'})
    with pytest.raises(lmstudio.LMStudioPresetNotFoundError, match="lmscli has no presets"):
        model.respond("hi", preset="fast")
    assert model.respond("hi").content == DEFAULT_REPLY  # the connection is still fine


def test_structured_response_is_parsed(sdk: lmstudio.Client) -> None:
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
    result = sdk.llm.model("tiny-chat").respond('[[reply: {"city": "Paris"}]]',
                                                response_format=schema)
    assert result.structured and result.parsed == {"city": "Paris"}


def test_complete_sends_the_raw_prompt(fake_server: ThreadServer,
                                       sdk: lmstudio.Client) -> None:
    model = sdk.llm.model("tiny-chat")
    with raw(fake_server, "diagnostics") as logs:
        logs.send(json.dumps({"type": "channelCreate", "endpoint": "streamLogs", "channelId": 1}))
        time.sleep(0.2)  # subscribed before the prediction starts
        assert model.complete("The sky is").content == DEFAULT_REPLY
        inputs = []
        while not inputs:
            message = recv(logs)["message"]
            if message["log"]["data"]["type"] == "llm.prediction.input":
                inputs.append(message["log"]["data"]["input"])
        assert inputs == ["The sky is"]  # no chat template around it
        logs.send(json.dumps({"type": "channelSend", "channelId": 1,
                              "message": {"type": "stop"}}))
        while (message := recv(logs))["type"] == "channelSend":
            pass
        assert message == {"type": "channelClose", "channelId": 1}


def test_cancel_mid_reply_ends_with_user_stopped(sdk: lmstudio.Client) -> None:
    stream = sdk.llm.model("tiny-chat").respond_stream("[[slow]] [[count: 200]]")
    fragments = []
    for fragment in stream:
        fragments.append(fragment.content)
        if len(fragments) == 3:
            stream.cancel()
    result = stream.result()
    assert result.stats.stop_reason == "userStopped"
    assert result.stats.predicted_tokens_count < 50


def test_several_clients_predict_at_once(fake_server: ThreadServer) -> None:
    results: dict[int, str] = {}

    def run(i: int) -> None:
        with client(fake_server) as c:
            results[i] = c.llm.model("tiny-chat").respond(f"[[slow]] [[count: {i + 3}]]").content

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == {i: " ".join(f"n{k}" for k in range(1, i + 4)) for i in range(4)}
    instance = fake_server.models.loaded["tiny-chat"].instance
    assert any(len(batch) > 1 for batch in instance.backend.decoded_batches)  # decoded together


def test_disconnect_mid_prediction_cancels_it(fake_server: ThreadServer,
                                              sdk: lmstudio.Client) -> None:
    sdk.llm.model("tiny-chat")
    entry = fake_server.models.loaded["tiny-chat"]
    with raw(fake_server) as ws:
        ws.send(predict_message("[[slow]] [[count: 500]]"))
        while recv(ws)["message"]["type"] != "fragment":
            pass
        assert entry.active == 1 and entry.instance.active == 1
        ws.close()
        deadline = time.monotonic() + 5
        while (entry.active or entry.instance.active) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (entry.active, entry.instance.active, entry.instance.queued) == (0, 0, 0)
        assert entry.instance.status == "idle"


# -- act() ----------------------------------------------------------------------------------

class ScriptedBackend(FakeBackend):
    """Answers the n-th act() round with ``script[n]``: rounds are counted by the tool
    results the prompt already holds."""

    script: list[str] = []

    def new_sampler(self, request: Any) -> FakeSampler:
        n = min(request.prompt.count(RESULT_CLOSE), len(self.script) - 1)
        return FakeSampler(self.tokenize(self.script[n], False), 0.0)


class ScriptedEngine(FakeEngine):
    def __init__(self, script: list[str]) -> None:
        super().__init__()
        self.script = script

    def backend(self, spec: Any, options: Any) -> FakeBackend:
        backend = ScriptedBackend(spec, options, self.reply)
        backend.script = self.script
        return backend


def call(name: str, **arguments: Any) -> str:
    body = json.dumps({"name": name, "arguments": arguments})
    return f"[TOOL_REQUEST]{body}[END_TOOL_REQUEST]"


def add(a: int, b: int) -> int:
    """Given two numbers a and b, returns the sum of them."""
    return a + b


def is_prime(n: int) -> bool:
    """Given a number n, returns True if n is a prime number."""
    return n > 1 and all(n % i for i in range(2, int(n**0.5) + 1))


@pytest.fixture
def scripted(fake_models: Path) -> Iterator[ThreadServer]:
    server = ThreadServer(ScriptedEngine([
        call("add", a=12345, b=45668), call("is_prime", n=58013), "58013 is a prime."]))
    yield server
    server.stop()


def test_act_two_tools_over_three_rounds(scripted: ThreadServer) -> None:
    events: list[Any] = []
    with client(scripted) as c:
        result = c.llm.model("tiny-chat").act(
            "Is the result of 12345 + 45668 a prime? Think step by step.", [add, is_prime],
            on_round_start=lambda i: events.append(("round_start", i)),
            on_round_end=lambda i: events.append(("round_end", i)),
            on_prediction_completed=lambda r: events.append(
                ("completed", r.round_index, r.stats.stop_reason)),
            on_message=lambda m: events.append(("message", m)),
            on_first_token=lambda i: events.append(("first", i)))
    assert result.rounds == 3
    flow = [e if e[0] != "message" else ("message", type(e[1]).__name__) for e in events
            if e[0] != "first"]
    assert flow == [
        ("round_start", 0), ("completed", 0, "toolCalls"), ("message", "AssistantResponse"),
        ("message", "ToolResultMessage"), ("round_end", 0),
        ("round_start", 1), ("completed", 1, "toolCalls"), ("message", "AssistantResponse"),
        ("message", "ToolResultMessage"), ("round_end", 1),
        ("round_start", 2), ("completed", 2, "eosFound"), ("message", "AssistantResponse"),
        ("round_end", 2)]
    results = [e[1].content[0].content for e in events
               if e[0] == "message" and type(e[1]).__name__ == "ToolResultMessage"]
    assert results == ["58013", "true"]
    # a round that only calls tools streams no text fragment (LM Studio's text is "" there)
    assert [e[1] for e in events if e[0] == "first"] == [2]


# -- the protocol, frame by frame -----------------------------------------------------------

def test_rpc_result_and_unknown_endpoint(fake_server: ThreadServer) -> None:
    with raw(fake_server, "system") as ws:
        ws.send(json.dumps({"type": "rpcCall", "endpoint": "version", "callId": 7}))
        reply = recv(ws)
        assert reply["type"] == "rpcResult" and reply["callId"] == 7 and reply["result"]["version"]
        ws.send(json.dumps({"type": "rpcCall", "endpoint": "frobnicate", "callId": 8}))
        reply = recv(ws)
        assert reply["type"] == "rpcError" and reply["callId"] == 8
        assert "does not implement the endpoint 'frobnicate'" in reply["error"]["title"]
        ws.send(json.dumps({"type": "channelCreate", "endpoint": "nope", "channelId": 1}))
        reply = recv(ws)
        assert reply["type"] == "channelError" and reply["channelId"] == 1


def test_bad_frames_get_warnings_and_the_socket_stays_up(fake_server: ThreadServer) -> None:
    with raw(fake_server, "system") as ws:
        for frame in ["{not json", "[1, 2]", json.dumps({"type": "rpcCall", "callId": "x"}),
                      json.dumps({"type": "mystery"})]:
            ws.send(frame)
        warnings = [recv(ws) for _ in range(4)]
        assert all(w["type"] == "communicationWarning" for w in warnings)
        assert "not valid JSON" in warnings[0]["warning"]
        assert warnings[1]["warning"] == "A message must be a JSON object."
        assert warnings[3]["warning"] == "Unknown message type 'mystery'."
        ws.send(json.dumps({"type": "keepAlive"}))
        assert recv(ws) == {"type": "keepAliveAck"}
        ws.send(json.dumps({"type": "rpcCall", "endpoint": "listDownloadedModels", "callId": 1}))
        assert len(recv(ws)["result"]) == 3


def test_predict_frames_match_lm_studio(fake_server: ThreadServer,
                                        sdk: lmstudio.Client) -> None:
    sdk.llm.model("tiny-chat")
    with raw(fake_server) as ws:
        # keys lmscli has no use for are ignored, as LM Studio ignores unknown keys
        ws.send(predict_message("[[count: 2]]", temperature=0, xtcProbability=0.5))
        messages = []
        while not messages or messages[-1]["type"] == "channelSend":
            messages.append(recv(ws))
        assert messages[-1] == {"type": "channelClose", "channelId": 1}
        kinds = [m["message"]["type"] for m in messages[:-1]]
        assert kinds[0] == "promptProcessingProgress" and kinds[-1] == "success"
        fragment = next(m["message"]["fragment"] for m in messages[:-1]
                        if m["message"]["type"] == "fragment")
        assert set(fragment) >= {"content", "tokensCount", "containsDrafted", "reasoningType"}
        success = messages[-2]["message"]
        assert set(success) >= {"stats", "modelInfo", "loadModelConfig", "predictionConfig"}


def test_auth_handshake_rules(fake_server: ThreadServer) -> None:
    with raw(fake_server, auth=None) as ws:
        ws.send("hello?")  # ignored while waiting for the auth packet
        ws.send(json.dumps({**AUTH, "authVersion": 2}))
        reply = recv(ws)
        assert reply["success"] is False and "authVersion" in reply["error"]["title"]


@pytest.fixture
def keyed_server(fake_models: Path) -> Iterator[ThreadServer]:
    server = ThreadServer(FakeEngine(), api_key="sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST")
    yield server
    server.stop()


def test_api_key_is_asked_for_in_the_handshake(keyed_server: ThreadServer) -> None:
    port = keyed_server.port
    with lmstudio.Client(f"127.0.0.1:{port}") as c, \
            pytest.raises(lmstudio.LMStudioServerError, match="needs an API key"):
        c.list_downloaded_models()
    # lmstudio-python 1.5 has no token option; 1.6 sends sk-lm-<id>:<passkey> split like this
    with lmstudio.Client(f"127.0.0.1:{port}") as c:
        c._auth_details = c._format_auth_message("abcdefgh", "ABCDEFGHIJKLMNOPQRST")
        assert len(c.list_downloaded_models()) == 3
    bearer = {"Authorization": "Bearer sk-lm-abcdefgh:ABCDEFGHIJKLMNOPQRST"}
    with raw(keyed_server, "system", additional_headers=bearer):
        pass
    with pytest.raises(InvalidStatus):
        connect(f"ws://127.0.0.1:{port}/system", additional_headers={
            "Authorization": "Bearer wrong"})


def test_web_pages_of_other_sites_cannot_open_a_socket(fake_server: ThreadServer) -> None:
    with pytest.raises(InvalidStatus) as refused:
        connect(f"ws://127.0.0.1:{fake_server.port}/llm", origin="https://evil.example")
    assert refused.value.response.status_code == 403
    with raw(fake_server, origin="http://localhost:3000"):  # this machine's own pages
        pass
    assert httpx.get(fake_server.base_url + "/lmstudio-greeting").json() == {"lmstudio": True}
