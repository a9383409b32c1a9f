"""Tool use over HTTP and through act(), with the fake engine replaying recorded outputs."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

import lmscli as lms
from lmscli.client import default
from lmscli.engine.fake import DEFAULT_REPLY
from tests.conftest import ThreadServer

SAY_HELLO = {"type": "function", "function": {
    "name": "say_hello", "description": "Says hello to someone",
    "parameters": {"type": "object", "properties": {"name": {"type": "string"}},
                   "required": ["name"]}}}
CALL = '[TOOL_REQUEST]{"name": "say_hello", "arguments": {"name": "Bob"}}[END_TOOL_REQUEST]'
TWO_CALLS = ('Let me do both. [TOOL_REQUEST]{"name": "say_hello", "arguments": {"name": "A"}}'
             '[END_TOOL_REQUEST][TOOL_REQUEST]{"name": "say_hello", "arguments": {"name": "B"}}'
             '[END_TOOL_REQUEST]')


@pytest.fixture(autouse=True)
def fresh_default_client() -> Iterator[None]:
    default.reset_default_client()
    yield


def sdk(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="lm-studio", max_retries=0)


def ask(server: ThreadServer, content: str, **kw: object) -> object:
    return sdk(server).chat.completions.create(
        model="tiny-chat", messages=[{"role": "user", "content": content}], **kw)


def test_a_call_comes_back_in_tool_calls(fake_server: ThreadServer) -> None:
    r = ask(fake_server, f"[[reply: {CALL}]]", tools=[SAY_HELLO])
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "say_hello" and call.type == "function" and call.id
    assert json.loads(call.function.arguments) == {"name": "Bob"}
    assert not choice.message.content


def test_without_tools_the_same_text_is_content(fake_server: ThreadServer) -> None:
    r = ask(fake_server, f"[[reply: {CALL}]]")
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls


def test_malformed_call_is_plain_content(fake_server: ThreadServer) -> None:
    bad = '[TOOL_REQUEST]{"name": "say_hello", "arguments": {oops}[END_TOOL_REQUEST]'
    r = ask(fake_server, f"[[reply: {bad}]]", tools=[SAY_HELLO])
    assert r.choices[0].message.content == bad
    assert r.choices[0].finish_reason == "stop"


def test_streamed_calls_accumulate_like_the_docs_example(fake_server: ThreadServer) -> None:
    stream = ask(fake_server, f"[[reply: {TWO_CALLS}]]", tools=[SAY_HELLO], stream=True)
    collected_text, tool_calls, first_chunks = "", [], []
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        finish = chunk.choices[0].finish_reason or finish
        if delta.content:
            collected_text += delta.content
        elif delta.tool_calls:
            for tc in delta.tool_calls:
                if len(tool_calls) <= tc.index:
                    tool_calls.append({"id": "", "type": "function",
                                       "function": {"name": "", "arguments": ""}})
                    first_chunks.append(tc)
                tool_calls[tc.index] = {
                    "id": tool_calls[tc.index]["id"] + (tc.id or ""),
                    "type": "function",
                    "function": {
                        "name": tool_calls[tc.index]["function"]["name"]
                        + (tc.function.name or ""),
                        "arguments": tool_calls[tc.index]["function"]["arguments"]
                        + (tc.function.arguments or "")}}
    assert collected_text.strip() == "Let me do both."
    assert [json.loads(c["function"]["arguments"]) for c in tool_calls] == [
        {"name": "A"}, {"name": "B"}]
    assert all(c["id"] and c["function"]["name"] == "say_hello" for c in tool_calls)
    assert all(first.id and first.function.name for first in first_chunks)
    assert finish == "tool_calls"


def test_tool_messages_are_accepted_in_any_mix(fake_server: ThreadServer) -> None:
    messages = [
        {"role": "system", "content": "You help."},
        {"role": "user", "content": "Say hello to Bob"},
        {"role": "assistant", "tool_calls": [{"id": "1", "type": "function", "function": {
            "name": "say_hello", "arguments": '{"name": "Bob"}'}}]},
        {"role": "tool", "content": "done", "tool_call_id": "1"},
        {"role": "assistant", "content": "I said hello."},
        {"role": "user", "content": "thanks"},
    ]
    r = sdk(fake_server).chat.completions.create(model="tiny-chat", messages=messages,
                                                 tools=[SAY_HELLO])
    assert r.choices[0].message.content == DEFAULT_REPLY


@pytest.mark.parametrize(("extra", "param"), [
    ({"tools": "nope"}, "tools"),
    ({"tools": [{"type": "function"}]}, "tools[0].function"),
    ({"tools": [{"type": "function", "function": {"description": "x"}}]},
     "tools[0].function.name"),
    ({"tools": [SAY_HELLO], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [SAY_HELLO], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     "tool_choice.function.name"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "assistant", "tool_calls": "x"}]}, "messages[0].tool_calls"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"type": "function",
                                                         "function": {"name": "f",
                                                                      "arguments": "{bad"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]},
     "messages[0].tool_call_id"),
])
def test_bad_tool_fields_name_the_field(fake_server: ThreadServer, extra: dict,
                                        param: str) -> None:
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}]} | extra
    r = httpx.post(fake_server.base_url + "/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param


# -- act() ----------------------------------------------------------------------------------

def say_hello(name: str) -> str:
    """Says hello to someone."""
    return f"Hello, {name}!"


def test_act_round_order_and_results(fake_server: ThreadServer) -> None:
    events: list[tuple] = []
    chat = lms.Chat()
    chat.add_user_message(f"[[reply: {CALL}]]")
    result = lms.llm("tiny-chat").act(
        chat, [say_hello],
        on_round_start=lambda i: events.append(("round_start", i)),
        on_round_end=lambda i: events.append(("round_end", i)),
        on_prediction_completed=lambda r: events.append(
            ("completed", r.round_index, r.stats.stop_reason)),
        on_message=lambda m: events.append(("message", type(m).__name__)),
        on_first_token=lambda i: events.append(("first", i)),
    )
    assert result.rounds == 2 and result.total_time_seconds > 0
    flow = [e for e in events if e[0] != "first"]
    assert flow == [("round_start", 0), ("completed", 0, "toolCalls"),
                    ("message", "AssistantResponse"), ("message", "ToolResultMessage"),
                    ("round_end", 0), ("round_start", 1), ("completed", 1, "eosFound"),
                    ("message", "AssistantResponse"), ("round_end", 1)]
    assert ("first", 1) in events


def test_act_sends_json_results_and_errors_back(fake_server: ThreadServer) -> None:
    messages: list = []

    def broken(name: str) -> str:
        """Always fails."""
        raise ValueError("no")

    for reply, expected in [
        (CALL, '"Hello, Bob!"'),
        (CALL.replace("say_hello", "nope"), "Cannot find tool with name nope."),
        (CALL.replace('"Bob"', "7"),
         "Failed to parse arguments for tool say_hello: Expected `str`, got `int`"),
    ]:
        messages.clear()
        chat = lms.Chat()
        chat.add_user_message(f"[[reply: {reply}]]")
        lms.llm("tiny-chat").act(chat, [say_hello], on_message=messages.append)
        assert messages[1].content[0]["content"].startswith(expected)
    messages.clear()
    chat = lms.Chat.from_history(f"[[reply: {CALL.replace('say_hello', 'broken')}]]")
    lms.llm("tiny-chat").act(chat, [broken], on_message=messages.append)
    assert json.loads(messages[1].content[0]["content"]) == \
        "Unhandled Python exception: ValueError('no')"


def test_handle_invalid_tool_request(fake_server: ThreadServer) -> None:
    chat = lms.Chat.from_history(f"[[reply: {CALL.replace('say_hello', 'nope')}]]")
    messages: list = []
    lms.llm("tiny-chat").act(chat, [say_hello], on_message=messages.append,
                             handle_invalid_tool_request=lambda exc, req: "try say_hello")
    assert messages[1].content[0]["content"] == "try say_hello"

    def refuse(exc: Exception, request: object) -> None:
        raise RuntimeError(f"refused: {exc}")

    with pytest.raises(RuntimeError, match="refused: Cannot find tool"):
        lms.llm("tiny-chat").act(chat, [say_hello], handle_invalid_tool_request=refuse)


def test_capped_rounds_send_no_tools_on_the_last(fake_server: ThreadServer) -> None:
    chat = lms.Chat.from_history(f"[[reply: {CALL}]]")
    messages: list = []
    ran: list = []

    def counted(name: str) -> str:
        """Says hello to someone."""
        ran.append(name)
        return "hi"

    result = lms.llm("tiny-chat").act(chat, [counted], max_prediction_rounds=1,
                                      on_message=messages.append)
    # the one round is the last: no tools were offered, so the call text stays text
    assert result.rounds == 1 and not ran
    assert [m.role for m in messages] == ["assistant"]
    assert messages[0].text == CALL.replace("say_hello", "say_hello")
    with pytest.raises(lms.LMSError, match="at least 1"):
        lms.llm("tiny-chat").act(chat, [say_hello], max_prediction_rounds=0)


def test_callers_chat_changes_only_through_on_message(fake_server: ThreadServer) -> None:
    chat = lms.Chat.from_history(f"[[reply: {CALL}]]")
    lms.llm("tiny-chat").act(chat, [say_hello])
    assert len(chat) == 1
    lms.llm("tiny-chat").act(chat, [say_hello], on_message=chat.append)
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
