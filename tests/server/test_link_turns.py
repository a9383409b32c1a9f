"""The agent APIs on a linked model, fake engines behind real servers: /v1/responses and
/v1/messages (official openai and anthropic SDKs) and /api/v1/chat, translated to the
upstream's streamed chat completions. The real model and llama_cpp.server:
test_link_turns_real.py."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import lmstudio
import openai
import pytest

from lmscli.server.apis.parsing import sampling
from lmscli.server.body import Body
from lmscli.server.links.registry import LinkTarget
from lmscli.server.links.turn import chat_payload
from lmscli.server.pipeline.turns import TurnInput
from tests.conftest import ThreadServer, prediction_logs
from tests.server.test_agent_apis import CALL, CLAUDE_WEATHER, WEATHER
from tests.server.test_links import (  # noqa: F401  (fixtures)
    Engines,
    engines,
    fresh_clients,
    front,
    link,
    respond_cancel_and_act,
    upstream_status,
    wait_until,
)


def oai(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0)


def claude(server: ThreadServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="none", max_retries=0)


@pytest.fixture
def linked(front: ThreadServer, engines: Engines,  # noqa: F811
           capsys: pytest.CaptureFixture[str]) -> ThreadServer:
    link(capsys, "up", engines("up"))
    return front


# -- the request sent upstream, unit ---------------------------------------------------------

def test_the_chat_request_carries_tools_schema_and_only_changed_sampling() -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": {"type": "object"}}}
    wanted = TurnInput([{"role": "user", "content": "hi"}], [{"type": "function"}], "required",
                       "root ::= x", prefill="The answer:", response_format=fmt)
    params = sampling(Body({"temperature": 0.8, "top_k": 5, "max_tokens": 7,
                            "stop": ["END"], "seed": 3}))
    payload = chat_payload(LinkTarget("m", [], "up/m"), wanted, params)
    assert payload["model"] == "m" and payload["stream"] is True
    assert payload["stream_options"] == {"include_usage": True}
    assert payload["messages"][-1] == {"role": "assistant", "content": "The answer:"}
    assert payload["tools"] == [{"type": "function"}] and payload["tool_choice"] == "required"
    assert payload["response_format"] == fmt
    assert payload["top_k"] == 5 and "temperature" not in payload  # 0.8 is our default
    assert (payload["max_tokens"], payload["stop"], payload["seed"]) == (7, ["END"], 3)
    assert "grammar" not in json.dumps(payload)


# -- /v1/responses ----------------------------------------------------------------------------

def test_responses_whole_streamed_and_a_tool_round(linked: ThreadServer) -> None:
    client = oai(linked)
    r = client.responses.create(model="up/tiny-chat", input="[[reply: hello from afar]]")
    assert r.output_text == "hello from afar" and r.status == "completed"
    assert r.model == "up/tiny-chat"
    assert r.usage is not None and r.usage.output_tokens == 3 and r.usage.input_tokens > 0
    kinds, text = [], ""
    for event in client.responses.create(model="tiny-chat", stream=True,
                                         input="[[reply: <think>hm</think>streamed]]"):
        kinds.append(event.type)
        text += event.delta if event.type == "response.output_text.delta" else ""
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and text == "streamed"
    assert kinds.index("response.reasoning_text.delta") < kinds.index(
        "response.output_text.delta")
    called = client.responses.create(model="tiny-chat", input=f"[[reply: {CALL}]]",
                                     tools=[WEATHER])  # type: ignore[list-item]
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    answered = client.responses.create(
        model="tiny-chat", previous_response_id=called.id, tools=[WEATHER],  # type: ignore
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": "sunny"}, {"role": "user", "content": "[[reply: it is sunny]]"}])
    assert answered.output_text == "it is sunny"


def test_an_upstream_refusal_is_the_callers_error_and_logged(linked: ThreadServer) -> None:
    """The upstream (a 256-token model) refuses a longer prompt: the caller gets that 4xx,
    through the agent APIs and the lmstudio SDK alike, and the log shows the failure."""
    long = "word " * 600

    def ask() -> None:
        with pytest.raises(openai.BadRequestError) as info:
            oai(linked).responses.create(model="up/tiny-chat", input=long)
        assert "The linked engine up refused the request" in info.value.message

    given, produced = prediction_logs(linked.base_url, 2, ask)
    assert given["type"] == "llm.prediction.input"
    assert produced["type"] == "llm.prediction.output"
    assert produced["stats"]["stopReason"] == "failed"
    with lmstudio.Client(f"127.0.0.1:{linked.port}") as client, \
            pytest.raises(lmstudio.LMStudioServerError, match="refused the request"):
        client.llm.model("up/tiny-chat").respond(long)
    assert oai(linked).responses.create(model="up/tiny-chat",
                                        input="[[reply: still here]]").output_text == \
        "still here"


def test_a_client_that_leaves_a_response_stream_stops_the_upstream(
        front: ThreadServer, engines: Engines,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    up = engines("up")
    link(capsys, "up", up)
    body = {"model": "tiny-chat", "stream": True, "input": "[[slow]] [[count: 400]]"}
    with httpx.stream("POST", front.base_url + "/v1/responses", json=body) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(12)]
        assert upstream_status(up) == ["generating"]
    assert wait_until(lambda: upstream_status(up) == ["idle"], timeout=3)


# -- /v1/messages -----------------------------------------------------------------------------

def test_messages_whole_streamed_tool_use_and_a_count(linked: ThreadServer) -> None:
    client = claude(linked)
    m = client.messages.create(model="up/tiny-chat", max_tokens=50, messages=[
        {"role": "user", "content": "[[reply: bonjour]]"}])
    assert [b.text for b in m.content if b.type == "text"] == ["bonjour"]
    assert m.stop_reason == "end_turn" and m.usage.output_tokens == 1
    with client.messages.stream(model="tiny-chat", max_tokens=50, messages=[
            {"role": "user", "content": "[[reply: streamed bonjour]]"}]) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds and final.content[0].text == "streamed bonjour"
    assert final.usage.output_tokens == 2
    used = client.messages.create(model="tiny-chat", max_tokens=80, tools=[
        CLAUDE_WEATHER], messages=[{"role": "user", "content": f"[[reply: {CALL}]]"}])
    (tool,) = [b for b in used.content if b.type == "tool_use"]
    assert used.stop_reason == "tool_use" and tool.id.startswith("toolu_")
    assert tool.name == "get_weather" and tool.input == {"city": "Paris"}
    count = client.messages.count_tokens(model="tiny-chat", messages=[
        {"role": "user", "content": "a question of about forty characters..."}])
    assert 10 < count.input_tokens < 40
    with pytest.raises(anthropic.BadRequestError):
        client.messages.count_tokens(model="tiny-chat", messages=[])


# -- /api/v1/chat -----------------------------------------------------------------------------

def test_v1_chat_whole_and_streamed(linked: ThreadServer) -> None:
    url = linked.base_url + "/api/v1/chat"
    r = httpx.post(url, json={"model": "up/tiny-chat", "input": "[[reply: v1 hello]]"})
    body = r.json()
    assert r.status_code == 200 and body["output"] == [{"type": "message",
                                                        "content": "v1 hello"}]
    assert body["model_instance_id"] == "up/tiny-chat"
    assert body["stats"]["total_output_tokens"] == 2
    again = httpx.post(url, json={"model": "tiny-chat", "input": "[[reply: again]]",
                                  "previous_response_id": body["response_id"]})
    assert again.json()["output"][0]["content"] == "again"
    kinds, deltas, data = v1_stream(url, {"model": "tiny-chat", "stream": True,
                                          "input": "[[reply: <think>so</think>v1 stream]]"})
    assert kinds[0] == "chat.start" and kinds[-1] == "chat.end"
    assert kinds.index("reasoning.delta") < kinds.index("message.start")
    assert "".join(deltas) == "v1 stream"
    assert data["result"]["output"][0] == {"type": "reasoning", "content": "so"}


# -- the log bus ------------------------------------------------------------------------------

def test_a_linked_turn_is_on_the_log_stream(linked: ThreadServer) -> None:
    events = prediction_logs(linked.base_url, 2, lambda: oai(linked).responses.create(
        model="tiny-chat", input="[[reply: logged turn]]"))
    given, produced = events
    assert json.loads(given["input"]) == [{"role": "user", "content": "[[reply: logged turn]]"}]
    assert given["modelPath"] == "up/tiny-chat"
    assert produced["output"] == "logged turn" and produced["stats"]["stopReason"] == "eosFound"


# -- the lmstudio SDK's websocket -------------------------------------------------------------

def test_lmstudio_sdk_respond_stream_cancel_and_act(
        front: ThreadServer, engines: Engines,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    up = engines("up")
    link(capsys, "up", up)
    with lmstudio.Client(f"127.0.0.1:{front.port}") as client:
        respond_cancel_and_act(client, up, "hi over the websocket")


def v1_stream(url: str, body: dict[str, Any], timeout: float = 5
              ) -> tuple[list[str], list[str], dict[str, Any]]:
    """A streamed /api/v1/chat: its event types in order, the message's deltas, and the
    last event."""
    kinds, deltas, data = [], [], {}
    with httpx.stream("POST", url, json=body, timeout=timeout) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                data = json.loads(line[6:])
                kinds.append(data["type"])
                deltas += [data["content"]] if data["type"] == "message.delta" else []
    return kinds, deltas, data
