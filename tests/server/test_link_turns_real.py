"""The agent APIs on a linked model with the real default model: /v1/responses (openai),
/v1/messages (anthropic), /api/v1/chat and the lmstudio SDK through a front lmscli server
linked to another lmscli server and to llama-cpp-python's own server, which speaks neither
the Responses nor the Messages API: the front translates to chat completions."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import lmstudio
import openai
import pytest

from tests.conftest import ProcessServer
from tests.server.test_agent_apis import CLAUDE_WEATHER, WEATHER
from tests.server.test_link_turns import v1_stream
from tests.server.test_links_real import (  # noqa: F401  (fixtures)
    LINKS,
    MODEL,
    fresh_default_client,
    front,
    llamacpp,
)

pytestmark = pytest.mark.real
QUESTION = "What is the capital of France?"


def oai(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def claude(server: ProcessServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="none", max_retries=0,
                               timeout=120)


@pytest.mark.parametrize("link", LINKS)
def test_responses_whole_and_streamed(front: ProcessServer, link: str) -> None:  # noqa: F811
    ask: dict[str, Any] = {"model": f"{link}/{MODEL}", "input": QUESTION, "temperature": 0,
                           "max_output_tokens": 8}
    whole = oai(front).responses.create(**ask)
    assert whole.output_text and whole.model == f"{link}/{MODEL}"
    assert whole.usage is not None and 0 < whole.usage.output_tokens <= 8
    # llama_cpp.server sends no usage in a stream (it ignores stream_options): the output
    # is counted chunk by chunk, the prompt stays unknown
    assert whole.usage.input_tokens > 0 or link == "llamacpp"
    kinds, text, final = [], "", None
    for event in oai(front).responses.create(**ask, stream=True):
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert kinds[:3] == ["response.created", "response.in_progress",
                         "response.output_item.added"]
    assert kinds.count("response.output_text.delta") >= 2 and text == whole.output_text
    assert final is not None and final.output_text == text and final.usage is not None


def test_responses_tool_call_round_trip(front: ProcessServer) -> None:  # noqa: F811
    model = f"llamacpp/{MODEL}"
    called = oai(front).responses.create(
        model=model, input="What is the weather in Paris?", tools=[WEATHER],  # type: ignore
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
        max_output_tokens=60)
    (call,) = [item for item in called.output if item.type == "function_call"]
    assert call.name == "get_weather"
    assert isinstance(json.loads(call.arguments).get("city"), str)
    answered = oai(front).responses.create(
        model=f"lmscli/{MODEL}", previous_response_id=called.id, temperature=0,
        max_output_tokens=20, input=[{"type": "function_call_output", "call_id": call.call_id,
                                      "output": "Sunny, 24 degrees"}])
    assert answered.output_text and answered.status in ("completed", "incomplete")
    streamed = list(oai(front).responses.create(
        model=model, input="What is the weather in Paris?", tools=[WEATHER],  # type: ignore
        tool_choice={"type": "function", "name": "get_weather"}, temperature=0,
        max_output_tokens=60, stream=True))
    kinds = [e.type for e in streamed]
    assert "response.function_call_arguments.delta" in kinds
    (done,) = [e for e in streamed if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == json.loads(call.arguments)


@pytest.mark.parametrize("link", LINKS)
def test_messages_whole_and_streamed(front: ProcessServer, link: str) -> None:  # noqa: F811
    # this anthropic release takes no temperature argument: it goes in the body
    ask: dict[str, Any] = {"model": f"{link}/{MODEL}", "max_tokens": 8,
                           "extra_body": {"temperature": 0},
                           "messages": [{"role": "user", "content": QUESTION}]}
    whole = claude(front).messages.create(**ask)
    assert whole.content[0].type == "text" and whole.content[0].text
    assert whole.stop_reason in ("max_tokens", "end_turn") and whole.usage.output_tokens > 0
    with claude(front).messages.stream(**ask) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert kinds.count("content_block_delta") >= 2
    assert final.content[0].text == whole.content[0].text  # type: ignore[union-attr]
    assert final.usage.output_tokens == whole.usage.output_tokens


def test_messages_tool_use(front: ProcessServer) -> None:  # noqa: F811
    used = claude(front).messages.create(
        model=f"llamacpp/{MODEL}", max_tokens=60, extra_body={"temperature": 0},
        tools=[CLAUDE_WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "tool", "name": "get_weather"},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    (tool,) = [b for b in used.content if b.type == "tool_use"]
    assert used.stop_reason == "tool_use" and tool.name == "get_weather"
    assert isinstance(tool.input, dict) and isinstance(tool.input.get("city"), str)


@pytest.mark.parametrize("link", LINKS)
def test_v1_chat(front: ProcessServer, link: str) -> None:  # noqa: F811
    ask = {"model": f"{link}/{MODEL}", "input": QUESTION, "temperature": 0,
           "max_output_tokens": 8}
    r = httpx.post(front.base_url + "/api/v1/chat", json=ask, timeout=120)
    body = r.json()
    assert r.status_code == 200, body
    (message,) = body["output"]
    assert message["type"] == "message" and message["content"]
    assert 0 < body["stats"]["total_output_tokens"] <= 8
    kinds, deltas, _ = v1_stream(front.base_url + "/api/v1/chat", ask | {"stream": True},
                                 timeout=120)
    assert kinds[0] == "chat.start" and kinds[-1] == "chat.end"
    assert "".join(deltas) == message["content"]


def test_lmstudio_sdk_respond(front: ProcessServer) -> None:  # noqa: F811
    with lmstudio.Client(f"127.0.0.1:{front.port}") as client:
        model = client.llm.model(f"llamacpp/{MODEL}")
        result = model.respond(QUESTION, config={"temperature": 0, "maxTokens": 8})
    assert result.content
    assert 0 < result.stats.predicted_tokens_count <= 8
    assert result.stats.stop_reason in ("maxPredictedTokensReached", "eosFound")
