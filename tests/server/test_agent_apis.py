"""/v1/responses and /v1/messages with the fake engine, driven by the official openai and
anthropic SDKs: event order, the think split, tool rounds, storage, errors, the log bus."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import httpx
import openai
import pytest

from lmscli.engine.fake import DEFAULT_REPLY, FakeEngine
from lmscli.server.pipeline.tooluse import ToolUse
from lmscli.server.pipeline.turns import ReasoningDelta, ThinkSplitter, TurnParser
from tests.cli.test_log_stream import LogProcess, event_of, start
from tests.conftest import ThreadServer

MODEL = "tiny-chat"
WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
CLAUDE_WEATHER = {"name": "get_weather", "description": "The weather in a city",
                  "input_schema": WEATHER["parameters"]}
CALL = '[TOOL_REQUEST]{"name": "get_weather", "arguments": {"city": "Paris"}}[END_TOOL_REQUEST]'


def oai(server: ThreadServer, key: str = "lm-studio") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=key, max_retries=0)


def claude(server: ThreadServer, key: str = "lm-studio") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def streams() -> Iterator[list[LogProcess]]:
    started: list[LogProcess] = []
    yield started
    for p in started:
        p.stop()


# -- the think split, unit ------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "<think>I should greet.</think>\n\nHello there",
    "  <think>I should greet.</think>Hello there",
])
def test_think_block_splits_off_however_the_text_is_cut(text: str) -> None:
    for size in (1, 2, 3, 7, len(text)):
        splitter, reasoning, answer = ThinkSplitter(), "", ""
        pieces = [text[i:i + size] for i in range(0, len(text), size)] + [""]
        for n, piece in enumerate(pieces):
            r, a = splitter.feed(piece, final=n == len(pieces) - 1)
            reasoning, answer = reasoning + r, answer + a
        assert (reasoning, answer) == ("I should greet.", "Hello there"), size


def test_think_only_counts_at_the_start_or_when_the_prompt_opened_it() -> None:
    plain = ToolUse(None, "default", None)
    later = TurnParser(plain, "<|im_start|>assistant\n").feed("Hi <think>x</think>", final=True)
    assert [type(e).__name__ for e in later] == ["ContentDelta"]
    opened = TurnParser(plain, "<|im_start|>assistant\n<think>\n")
    events = opened.feed("pondering</think>Answer", final=True)
    assert events[0] == ReasoningDelta("pondering") and events[1].text == "Answer"
    # a grammar (forced call, schema) shapes the whole reply: none of it is reasoning
    shaped = TurnParser(plain, "<|im_start|>assistant\n<think>\n", think=False)
    assert [type(e).__name__ for e in shaped.feed('{"a": 1}', final=True)] == ["ContentDelta"]
    cut_off = ThinkSplitter(inside=True)
    assert cut_off.feed("still thinking</th", final=True) == ("still thinking</th", "")


# -- /v1/responses ----------------------------------------------------------------------------

def test_responses_whole_and_streamed_agree(fake_server: ThreadServer) -> None:
    c = oai(fake_server)
    whole = c.responses.create(model=MODEL, input="hi", instructions="Be brief.")
    assert whole.status == "completed" and whole.output_text == DEFAULT_REPLY
    assert whole.usage.output_tokens == 6
    assert whole.usage.total_tokens == whole.usage.input_tokens + 6
    with c.responses.stream(model=MODEL, input="hi", instructions="Be brief.") as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.completed"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == DEFAULT_REPLY == final.output_text
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.input_tokens_details.cached_tokens > 0  # the same prompt again


def test_responses_reasoning_is_its_own_item(fake_server: ThreadServer) -> None:
    c = oai(fake_server)
    prompt = "[[reply: <think>The user greets me.</think> Hello!]]"
    whole = c.responses.create(model=MODEL, input=prompt)
    reasoning, message = whole.output
    assert reasoning.type == "reasoning" and message.type == "message"
    assert reasoning.content[0].text == "The user greets me."
    assert whole.output_text == "Hello!"
    assert whole.usage.output_tokens_details.reasoning_tokens > 0
    with c.responses.stream(model=MODEL, input=prompt) as stream:
        kinds = [e.type for e in stream]
    assert kinds.index("response.reasoning_text.done") < kinds.index(
        "response.output_text.delta")


def test_responses_cut_off_is_incomplete(fake_server: ThreadServer) -> None:
    c = oai(fake_server)
    r = c.responses.create(model=MODEL, input="[[count: 20]]", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "n1 n2 n3 " and r.output[0].status == "incomplete"
    events = list(c.responses.create(model=MODEL, input="[[count: 20]]", max_output_tokens=3,
                                     stream=True))
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.incomplete_details.reason == "max_output_tokens"


def test_responses_tool_round(fake_server: ThreadServer) -> None:
    c = oai(fake_server)
    with c.responses.stream(model=MODEL, input=f"[[reply: {CALL}]]", tools=[WEATHER],
                            tool_choice={"type": "function", "name": "get_weather"}
                            ) as stream:
        kinds = [e.type for e in stream]
        asked = stream.get_final_response()
    (call,) = asked.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id
    assert json.loads(call.arguments) == {"city": "Paris"}
    assert kinds[2:] == ["response.output_item.added",
                         "response.function_call_arguments.delta",
                         "response.function_call_arguments.delta",
                         "response.function_call_arguments.done",
                         "response.output_item.done", "response.completed"]
    answer = c.responses.create(model=MODEL, tools=[WEATHER], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": call.call_id, "name": call.name,
         "arguments": call.arguments},
        {"type": "function_call_output", "call_id": call.call_id,
         "output": "[[reply: Sunny in Paris.]]"}])
    assert answer.output_text == "Sunny in Paris." and answer.output[0].type == "message"


def test_responses_storage_and_continuation_reach_the_log(fake_server: ThreadServer,
                                                          streams: list[LogProcess]) -> None:
    c = oai(fake_server)
    c.responses.create(model=MODEL, input="warm up")  # the JIT load logs runtime events
    inputs = start(streams, "--json", "--filter", "input")
    first = c.responses.create(model=MODEL, input="My name is Ada.")
    second = c.responses.create(model=MODEL, input="What is my name?",
                                previous_response_id=first.id)
    prompts = [event_of(line)["data"]["input"] for line in inputs.out_lines(2)]
    assert "My name is Ada." in prompts[1] and DEFAULT_REPLY in prompts[1]
    assert c.responses.retrieve(second.id).output_text == second.output_text
    c.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match="No response found"):
        c.responses.retrieve(first.id)
    with pytest.raises(openai.NotFoundError, match="Previous response"):
        c.responses.create(model=MODEL, input="again", previous_response_id=second.id)
    unstored = c.responses.create(model=MODEL, input="hi", store=False)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_responses_bad_input_is_a_400_in_openai_shape(fake_server: ThreadServer) -> None:
    c = oai(fake_server)
    bad = [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input[0].content[0].type"),
        ({"input": "hi", "text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f",
                     "arguments": "[1]"}]}, "input[0].arguments"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
    ]
    for fields, param in bad:
        with pytest.raises(openai.BadRequestError) as info:
            c.responses.create(model=MODEL, **fields)
        assert info.value.body["param"] == param and info.value.status_code == 400
    with pytest.raises(openai.NotFoundError, match="not found"):
        c.responses.create(model="no-such-model", input="hi")
    assert c.responses.create(model=MODEL, input="still up").output_text == DEFAULT_REPLY


def test_responses_structured_output_uses_the_grammar_path(fake_server: ThreadServer) -> None:
    # the fake engine rejects any grammar that has "!invalid" in it, as llama.cpp would a bad one
    schema = {"type": "object", "properties": {"!invalid": {"type": "string"}}}
    fmt = {"type": "json_schema", "name": "x", "schema": schema}
    with pytest.raises(openai.BadRequestError) as info:
        oai(fake_server).responses.create(model=MODEL, input="hi", text={"format": fmt})
    assert info.value.body["param"] == "text.format"
    assert info.value.body["code"] == "invalid_grammar"


# -- /v1/messages ----------------------------------------------------------------------------

def test_messages_whole_and_streamed_agree(fake_server: ThreadServer) -> None:
    c = claude(fake_server)
    whole = c.messages.create(model=MODEL, max_tokens=50, system="Be brief.",
                              messages=user("hi"))
    assert [b.text for b in whole.content] == [DEFAULT_REPLY]
    assert whole.stop_reason == "end_turn" and whole.usage.output_tokens == 6
    with c.messages.stream(model=MODEL, max_tokens=50, system="Be brief.",
                           messages=user("hi")) as stream:
        kinds = [e.type for e in stream if e.type not in ("text", "input_json", "thinking")]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert final.content[0].text == DEFAULT_REPLY and final.stop_reason == "end_turn"
    total = final.usage.input_tokens + final.usage.cache_read_input_tokens
    assert total == whole.usage.input_tokens + whole.usage.cache_read_input_tokens
    assert final.usage.cache_read_input_tokens > 0  # the same prompt again
    counted = c.messages.count_tokens(model=MODEL, system="Be brief.", messages=user("hi"))
    assert counted.input_tokens == total


def test_messages_stop_reasons(fake_server: ThreadServer) -> None:
    c = claude(fake_server)
    r = c.messages.create(model=MODEL, max_tokens=2, messages=user("[[count: 9]]"))
    assert r.stop_reason == "max_tokens" and r.content[0].text == "n1 n2 "
    r = c.messages.create(model=MODEL, max_tokens=50, messages=user("[[count: 9]]"),
                          stop_sequences=["n4"])
    assert r.stop_reason == "stop_sequence" and r.stop_sequence == "n4"
    assert r.content[0].text == "n1 n2 n3 "


def test_messages_tool_round_with_thinking(fake_server: ThreadServer) -> None:
    c = claude(fake_server)
    with c.messages.stream(model=MODEL, max_tokens=100, tools=[CLAUDE_WEATHER],
                           tool_choice={"type": "auto"},  # a forced call leaves no thinking
                           messages=user(f"[[reply: <think>Use the tool.</think> {CALL}]]")
                           ) as stream:
        asked = stream.get_final_message()
    thinking, call = asked.content
    assert thinking.type == "thinking" and thinking.thinking == "Use the tool."
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert call.input == {"city": "Paris"} and asked.stop_reason == "tool_use"
    answer = c.messages.create(model=MODEL, max_tokens=100, tools=[CLAUDE_WEATHER], messages=[
        *user("Weather in Paris?"),
        {"role": "assistant", "content": [thinking.model_dump(), call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "[[reply: Sunny in Paris.]]"}]}])
    assert answer.content[0].text == "Sunny in Paris." and answer.stop_reason == "end_turn"


def test_messages_prefill_and_log(fake_server: ThreadServer,
                                  streams: list[LogProcess]) -> None:
    c = claude(fake_server)
    c.messages.create(model=MODEL, max_tokens=5, messages=user("warm up"))
    inputs = start(streams, "--json", "--filter", "input")
    c.messages.create(model=MODEL, max_tokens=50, messages=[
        *user("Say a JSON object"), {"role": "assistant", "content": '{"a":'}])
    prompt = event_of(inputs.out_lines(1)[0])["data"]["input"]
    assert prompt.endswith('<|im_start|>assistant\n{"a":')


def test_messages_bad_input_is_anthropic_shaped(fake_server: ThreadServer) -> None:
    c = claude(fake_server)
    bad = [
        {"max_tokens": 5, "messages": [{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "AA=="}}]}]},
        {"max_tokens": 5, "messages": user("hi"),
         "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"max_tokens": 5, "messages": user("hi"), "tool_choice": {"type": "tool",
                                                                  "name": "nope"}},
        {"max_tokens": 5, "messages": [{"role": "tool", "content": "hi"}]},
        {"max_tokens": 5, "messages": [{"role": "user", "content": []}]},
    ]
    for fields in bad:
        with pytest.raises(anthropic.BadRequestError) as info:
            c.messages.create(model=MODEL, **fields)
        assert info.value.body["type"] == "error"
        assert info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as info:
        c.messages.create(model="claude-local", max_tokens=5, messages=user("hi"))
    assert info.value.body["error"]["type"] == "not_found_error"
    r = httpx.post(fake_server.base_url + "/v1/messages", content=b'{"model": ',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith(
        "The request body is not valid JSON")
    r = httpx.post(fake_server.base_url + "/v1/messages", json={"model": MODEL,
                                                                 "messages": user("hi")})
    assert r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "Missing required field 'max_tokens'."}}
    r = httpx.get(fake_server.base_url + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    assert c.messages.create(model=MODEL, max_tokens=9, messages=user("up?")).content


def test_messages_failure_is_an_api_error(fake_server: ThreadServer) -> None:
    with pytest.raises(anthropic.InternalServerError) as info:
        claude(fake_server).messages.create(model=MODEL, max_tokens=5,
                                            messages=user("[[fail]]"))
    assert info.value.body["error"]["type"] == "api_error"


def test_anthropic_sdk_and_the_api_key(fake_models: object) -> None:
    server = ThreadServer(FakeEngine(), api_key="sekrit")
    try:
        reply = claude(server, "sekrit").messages.create(model=MODEL, max_tokens=9,
                                                         messages=user("hi"))
        assert reply.content[0].text == DEFAULT_REPLY
        with pytest.raises(anthropic.AuthenticationError) as info:
            claude(server, "wrong").messages.create(model=MODEL, max_tokens=9,
                                                    messages=user("hi"))
        assert info.value.body["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            oai(server, "wrong").responses.create(model=MODEL, input="hi")
    finally:
        server.stop()


def test_a_client_that_leaves_mid_stream_stops_the_prediction(
        fake_server: ThreadServer, streams: list[LogProcess]) -> None:
    c = claude(fake_server)
    c.messages.create(model=MODEL, max_tokens=5, messages=user("warm up"))
    outputs = start(streams, "--json", "--filter", "output")
    with c.messages.stream(model=MODEL, max_tokens=500,
                           messages=user("[[slow]] [[count: 200]]")) as stream:
        for text in stream.text_stream:
            if "n3" in text:
                break  # the client goes away mid-answer
    data = event_of(outputs.out_lines(1, timeout=15)[0])["data"]
    assert data["output"].startswith("n1 n2 n3") and len(data["output"].split()) < 200
    assert data["stats"]["stopReason"] == "userStopped"
    assert fake_server.models.loaded[MODEL].active == 0
