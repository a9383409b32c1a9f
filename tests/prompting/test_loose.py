"""Calls that small models write as plain JSON become tool calls in every API (fake engine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest

import lmscli as lms
from lmscli.cli import log as log_cli
from lmscli.client import default
from tests.conftest import ThreadServer, read_call_stream

DELIVERY = {"type": "function", "function": {
    "name": "get_delivery_date", "description": "Get the delivery date for a customer's order",
    "parameters": {"type": "object", "properties": {"order_id": {"type": "string"}},
                   "required": ["order_id"]}}}
# what Qwen2.5-Coder 0.5B answers to the docs' delivery example
FENCED = ('```json\n{\n  "name": "get_delivery_date",\n  "arguments": {\n    "order_id": '
          '"1017"\n  }\n}\n```')
NOT_OFFERED = '```json\n{"name": "cancel_order", "arguments": {"order_id": "1017"}}\n```'


@pytest.fixture(autouse=True)
def fresh_default_client() -> Iterator[None]:
    default.reset_default_client()
    yield


def ask(server: ThreadServer, reply: str, **kw: object) -> object:
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
    return client.chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": f"[[reply: {reply}]]"}], **kw)


def test_a_fenced_json_call_comes_back_as_a_tool_call(fake_server: ThreadServer) -> None:
    choice = ask(fake_server, FENCED, tools=[DELIVERY]).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_delivery_date" and call.id
    assert json.loads(call.function.arguments) == {"order_id": "1017"}


def test_streamed_clients_get_a_tool_call_and_never_the_json_as_text(
        fake_server: ThreadServer) -> None:
    reply = "Let me check that for you.\n" + FENCED
    stream = ask(fake_server, reply, tools=[DELIVERY], stream=True)
    text, name, arguments, finish = read_call_stream(stream)
    assert text == "Let me check that for you.\n"
    assert name == "get_delivery_date" and json.loads(arguments) == {"order_id": "1017"}
    assert finish == "tool_calls"


@pytest.mark.parametrize("stream", [False, True])
def test_json_naming_no_offered_tool_stays_text(fake_server: ThreadServer, stream: bool) -> None:
    response = ask(fake_server, NOT_OFFERED, tools=[DELIVERY], stream=stream)
    if stream:
        chunks = list(response)
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert not any(c.choices[0].delta.tool_calls for c in chunks)
        assert chunks[-1].choices[0].finish_reason == "stop"
    else:
        text = response.choices[0].message.content
        assert not response.choices[0].message.tool_calls
    assert text == NOT_OFFERED


def test_without_tools_the_json_is_only_text(fake_server: ThreadServer) -> None:
    message = ask(fake_server, FENCED).choices[0].message
    assert message.content == FENCED and not message.tool_calls


def test_lm_studio_rest_route_recovers_too(fake_server: ThreadServer) -> None:
    r = httpx.post(fake_server.base_url + "/api/v0/chat/completions", timeout=30, json={
        "model": "tiny-chat", "tools": [DELIVERY],
        "messages": [{"role": "user", "content": f"[[reply: {FENCED}]]"}]})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["function"]["name"] == "get_delivery_date"


def get_delivery_date(order_id: str) -> str:
    """Get the delivery date for a customer's order."""
    return f"Order {order_id} arrives on 2024-11-19."


def test_act_runs_a_tool_the_model_called_in_plain_json(fake_server: ThreadServer) -> None:
    messages: list = []
    result = lms.llm("tiny-chat").act(f"[[reply: {FENCED}]]", [get_delivery_date],
                                      on_message=messages.append)
    assert result.rounds == 2
    assert messages[0].content[1]["toolCallRequest"]["arguments"] == {"order_id": "1017"}
    assert json.loads(messages[1].content[0]["content"]) == "Order 1017 arrives on 2024-11-19."


def test_log_stream_says_a_call_was_recovered(fake_server: ThreadServer) -> None:
    ask(fake_server, "warm up")  # the JIT load's own events are not what this test reads
    env = os.environ | {"NO_COLOR": "1"}
    with subprocess.Popen([sys.executable, "-m", "lmscli", "log", "stream", "--stats"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as proc:
        try:
            assert proc.stderr is not None and proc.stdout is not None
            assert "Streaming logs" in proc.stderr.readline()  # printed once subscribed
            ask(fake_server, FENCED, tools=[DELIVERY])
            lines = []
            while not any(line.startswith("recoveredToolCalls: 1") for line in lines):
                lines.append(proc.stdout.readline())
        finally:
            proc.terminate()
    assert "recoveredToolCalls: get_delivery_date (written as plain JSON, returned as tool " \
           "calls)\n" in lines
    assert "stopReason: eosFound\n" in lines


def test_output_event_marks_recovered_calls_in_text_and_stats() -> None:
    event = {"timestamp": 0, "data": {
        "type": "llm.prediction.output", "modelIdentifier": "m", "output": FENCED,
        "recoveredToolCalls": ["get_delivery_date"],
        "stats": {"stopReason": "eosFound", "recoveredToolCalls": 1}}}
    text = log_cli.format_event(event, stats=True)
    assert "\nrecoveredToolCalls: get_delivery_date (written as plain JSON" in text
    assert text.endswith("stopReason: eosFound\nrecoveredToolCalls: 1\n\n\n")
    assert "recoveredToolCalls: 1" not in log_cli.format_event(event, stats=False)


def test_streams_keep_alive_while_a_call_is_held_back(fake_server: ThreadServer,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A long call written as plain JSON sends nothing until it is decided: the streams send
    lines that clients skip meanwhile, so that a read timeout does not end them."""
    from lmscli.server.pipeline import local as pipeline

    monkeypatch.setattr(pipeline, "KEEPALIVE_S", 0.0)
    body = {"model": "tiny-chat", "tools": [DELIVERY],
            "messages": [{"role": "user", "content": f"[[slow]] [[reply: {FENCED}]]"}]}
    with httpx.stream("POST", fake_server.base_url + "/lmscli/predict", json=body,
                      timeout=30) as r:
        lines = list(r.iter_lines())
    end = next(i for i, line in enumerate(lines) if "toolCallGenerationEnd" in line)
    assert "" in lines[:end]  # blank lines: the SDK client skips them
    assert '"recovered": true' in lines[end]
    with httpx.stream("POST", fake_server.base_url + "/v1/chat/completions",
                      json=body | {"stream": True}, timeout=30) as r:
        lines = list(r.iter_lines())
    assert ": keep-alive" in lines  # an SSE comment, which clients ignore
    assert not any('"content": "```' in line for line in lines)


def test_responses_and_messages_apis_recover_too(fake_server: ThreadServer) -> None:
    import anthropic

    tool = DELIVERY["function"]
    oai = openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="x", max_retries=0)
    with oai.responses.stream(model="tiny-chat", input=f"[[reply: {FENCED}]]",
                              tools=[{"type": "function", **tool}]) as stream:
        asked = stream.get_final_response()
    (call,) = asked.output
    assert call.type == "function_call" and call.name == "get_delivery_date"
    assert json.loads(call.arguments) == {"order_id": "1017"}
    claude = anthropic.Anthropic(base_url=fake_server.base_url, api_key="x", max_retries=0)
    with claude.messages.stream(model="tiny-chat", max_tokens=200, tools=[
            {"name": tool["name"], "description": tool["description"],
             "input_schema": tool["parameters"]}],
            messages=[{"role": "user", "content": f"[[reply: {FENCED}]]"}]) as stream:
        message = stream.get_final_message()
    assert [block.type for block in message.content] == ["tool_use"]
    assert message.content[0].input == {"order_id": "1017"}
    assert message.stop_reason == "tool_use"
