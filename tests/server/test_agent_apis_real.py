"""OpenAI's Responses API and Anthropic's Messages API on a real server with the default model,
driven by the official openai and anthropic packages: text, streams, two-round tool calls (the
fallback [TOOL_REQUEST] format and a Qwen-style native template), structured output, errors."""

from __future__ import annotations

import json
import re
from typing import Any

import anthropic
import openai
import pytest

from tests.conftest import ProcessServer
from tests.server.test_tooluse_real import qwen_server  # noqa: F401 - the smol-qwen fixture

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"
QUESTION = "What is the capital of France? Answer briefly."
# a bounded pattern: greedy decoding of a 135M model can otherwise fill a free string with
# whitespace until the token limit when the batch history tips a near tie
DELIVERY_SCHEMA = {"type": "object", "properties": {"order_id": {
    "type": "string", "pattern": "^[0-9]{1,8}$"}}, "required": ["order_id"]}
ASK = "Give me the delivery date for order number 1017."
RESULT = json.dumps({"order_id": "1017", "delivery_date": "2024-03-15"})
CITY = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                         "population": {"type": "integer"}},
        "required": ["city", "population"], "additionalProperties": False}
# anthropic 2.x dropped the sampling arguments from messages.create; the API still has them
GREEDY = {"temperature": 0}


def oai(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="lm-studio", max_retries=0)


def claude(server: ProcessServer) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key="lm-studio", max_retries=0)


@pytest.fixture(params=["fallback", "native"])
def tool_server(request: pytest.FixtureRequest, real_server: ProcessServer
                ) -> tuple[ProcessServer, str]:
    """The default model's [TOOL_REQUEST] format, and smol-qwen's <tool_call> template."""
    if request.param == "fallback":
        return real_server, MODEL
    return request.getfixturevalue("qwen_server"), "smol-qwen"


# -- /v1/responses ----------------------------------------------------------------------------

def test_responses_text_whole_and_streamed(real_server: ProcessServer) -> None:
    c = oai(real_server)
    kw: dict[str, Any] = {"model": MODEL, "input": QUESTION, "temperature": 0,
                          "max_output_tokens": 30, "instructions": "You are a helpful assistant."}
    whole = c.responses.create(**kw)
    assert whole.output_text.strip() and whole.status in ("completed", "incomplete")
    with c.responses.stream(**kw) as stream:
        kinds, deltas = [], []
        for event in stream:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = stream.get_final_response() if whole.status == "completed" else None
    assert "".join(deltas) == whole.output_text
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    end = "response.completed" if whole.status == "completed" else "response.incomplete"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", end]
    if final is not None:
        assert final.output_text == whole.output_text
        # the same prompt again: all but its last token comes from the cache
        assert final.usage.input_tokens_details.cached_tokens >= whole.usage.input_tokens - 1


def test_responses_two_round_tool_call(tool_server: tuple[ProcessServer, str]) -> None:
    server, model = tool_server
    c = oai(server)
    tools = [{"type": "function", "name": "get_delivery_date", "strict": False,
              "description": "Get the delivery date for a customer's order.",
              "parameters": DELIVERY_SCHEMA}]
    asked = c.responses.create(model=model, input=ASK, tools=tools, temperature=0,
                               tool_choice={"type": "function", "name": "get_delivery_date"})
    (call,) = asked.output
    assert call.type == "function_call" and call.name == "get_delivery_date"
    assert "order_id" in json.loads(call.arguments)
    # the second round continues the stored conversation: only the tool's answer is sent
    answer = c.responses.create(model=model, tools=tools, temperature=0, tool_choice="none",
                                max_output_tokens=40, previous_response_id=asked.id,
                                input=[{"type": "function_call_output",
                                        "call_id": call.call_id, "output": RESULT}])
    assert answer.output_text.strip()
    assert all(item.type == "message" for item in answer.output)


def test_responses_forced_custom_tool_follows_its_grammar(
        tool_server: tuple[ProcessServer, str]) -> None:
    """A freeform tool's Lark grammar holds the real model's input to it, streamed or not."""
    server, model = tool_server
    tool = {"type": "custom", "name": "run_sql", "description": "Run one SQL query.",
            "format": {"type": "grammar", "syntax": "lark", "definition": (
                'start: "SELECT " COLUMN " FROM users WHERE id = " INT\n'
                'COLUMN: "name" | "email"\n%import common.INT')}}
    # room for the call in single characters: where the grammar leaves the model only pieces
    # of the words it wants, nearly tied pieces can swap under drafting's batched sums
    kw: dict[str, Any] = {"model": model, "input": "What is the email of user 42?",
                          "tools": [tool], "temperature": 0, "max_output_tokens": 120,
                          "tool_choice": {"type": "custom", "name": "run_sql"}}
    whole = oai(server).responses.create(**kw)
    (call,) = whole.output
    assert call.type == "custom_tool_call" and call.name == "run_sql"
    query = re.compile(r"SELECT (name|email) FROM users WHERE id = \d+")
    assert query.fullmatch(call.input)
    events = list(oai(server).responses.create(**kw, stream=True))
    done = [e.input for e in events if e.type == "response.custom_tool_call_input.done"]
    assert len(done) == 1 and query.fullmatch(done[0])


def test_responses_structured_output(real_server: ProcessServer) -> None:
    r = oai(real_server).responses.create(
        model=MODEL, input="Name the capital of France and its population.", temperature=0,
        max_output_tokens=60,
        text={"format": {"type": "json_schema", "name": "city", "schema": CITY}})
    value = json.loads(r.output_text)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


def test_responses_errors_are_openai_shaped(real_server: ProcessServer) -> None:
    c = oai(real_server)
    with pytest.raises(openai.BadRequestError) as info:
        c.responses.create(model=MODEL, input=[{"role": "user", "content": [
            {"type": "input_image", "image_url": "https://example.com/a.png"}]}])
    assert info.value.body["param"] == "input[0].content[0].type"
    with pytest.raises(openai.NotFoundError) as missing:
        c.responses.create(model="gpt-5", input="hi")
    assert missing.value.body["code"] == "model_not_found"
    assert c.responses.create(model=MODEL, input="Hi", max_output_tokens=3).output_text


# -- /v1/messages -----------------------------------------------------------------------------

def test_messages_text_whole_streamed_and_counted(real_server: ProcessServer) -> None:
    c = claude(real_server)
    kw: dict[str, Any] = {"model": MODEL, "max_tokens": 30, "extra_body": GREEDY,
                          "system": "You are a helpful assistant.",
                          "messages": [{"role": "user", "content": QUESTION}]}
    whole = c.messages.create(**kw)
    (block,) = whole.content
    assert block.type == "text" and block.text.strip()
    assert whole.stop_reason in ("end_turn", "max_tokens")
    with c.messages.stream(**kw) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == block.text == final.content[0].text
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    prompt = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert final.usage.cache_read_input_tokens >= prompt - 1  # the same prompt again
    counted = c.messages.count_tokens(model=MODEL, system=kw["system"], messages=kw["messages"])
    assert counted.input_tokens == prompt


def test_messages_two_round_tool_call(tool_server: tuple[ProcessServer, str]) -> None:
    server, model = tool_server
    c = claude(server)
    tools = [{"name": "get_delivery_date", "input_schema": DELIVERY_SCHEMA,
              "description": "Get the delivery date for a customer's order."}]
    messages: list[Any] = [{"role": "user", "content": ASK}]
    with c.messages.stream(model=model, max_tokens=200, extra_body=GREEDY, tools=tools,
                           messages=messages,
                           tool_choice={"type": "tool", "name": "get_delivery_date"}
                           ) as stream:
        asked = stream.get_final_message()
    assert asked.stop_reason == "tool_use"
    call = asked.content[-1]
    assert call.type == "tool_use" and call.name == "get_delivery_date"
    assert "order_id" in call.input
    messages += [{"role": "assistant", "content": asked.content},
                 {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                               "content": RESULT}]}]
    answer = c.messages.create(model=model, max_tokens=40, extra_body=GREEDY, tools=tools,
                               tool_choice={"type": "none"}, messages=messages)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert [b.type for b in answer.content] == ["text"] and answer.content[0].text.strip()


def test_messages_structured_output(real_server: ProcessServer) -> None:
    r = claude(real_server).messages.create(
        model=MODEL, max_tokens=60, extra_body=GREEDY,
        messages=[{"role": "user", "content": "Name the capital of France and its population."}],
        output_config={"format": {"type": "json_schema", "schema": CITY}})
    value = json.loads(r.content[0].text)
    assert set(value) == {"city", "population"} and isinstance(value["population"], int)


def test_messages_errors_are_anthropic_shaped(real_server: ProcessServer) -> None:
    c = claude(real_server)
    with pytest.raises(anthropic.BadRequestError) as info:
        c.messages.create(model=MODEL, max_tokens=10, messages=[
            {"role": "user", "content": "hi"}], tools=[{"type": "bash_20250124",
                                                       "name": "bash"}])
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "invalid_request_error"
    assert "tools[0].type" in info.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        c.messages.create(model="claude-local", max_tokens=10,
                          messages=[{"role": "user", "content": "hi"}])
    assert missing.value.body["error"]["type"] == "not_found_error"
    ok = c.messages.create(model=MODEL, max_tokens=3, messages=[{"role": "user",
                                                                "content": "Hi"}])
    assert ok.content and ok.stop_reason in ("end_turn", "max_tokens")
