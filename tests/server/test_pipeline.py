"""One pipeline: every API gets the same prompt for the same request and the same split of
the reply (reasoning apart from the answer), while raw-text APIs get the text as it came.
Fake engine behind a real server; the official openai and anthropic SDKs as clients."""

from __future__ import annotations

import json
from typing import Any

import anthropic
import httpx
import openai

from tests.conftest import ThreadServer, prediction_logs

MODEL = "tiny-chat"
PARAMETERS = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"]}
THOUGHT = "[[reply: <think>The user wants a greeting.</think>\n\nHello there]]"


def oai(server: ThreadServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)


def prompt_of(server: ThreadServer, ask: Any) -> str:
    (given, _) = prediction_logs(server.base_url, 2, ask)
    assert given["type"] == "llm.prediction.input"
    return given["input"]


def test_a_strict_function_tool_makes_the_same_prompt_on_every_api(
        fake_server: ThreadServer) -> None:
    """``strict`` is for the API, not the model: chat completions, Responses and Messages
    show the model the same tool (the Agents SDK sends strict tools on both OpenAI APIs)."""
    client = oai(fake_server)
    question = "What is the weather in Paris?"
    chat = prompt_of(fake_server, lambda: client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}],
        tools=[{"type": "function", "function": {
            "name": "get_weather", "description": "The weather in a city",
            "parameters": PARAMETERS, "strict": True}}]))
    responses = prompt_of(fake_server, lambda: client.responses.create(
        model=MODEL, input=question, tools=[{
            "type": "function", "name": "get_weather", "description": "The weather in a city",
            "parameters": PARAMETERS, "strict": True}]))
    messages = prompt_of(fake_server, lambda: anthropic.Anthropic(
        base_url=fake_server.base_url, api_key="x", max_retries=0).messages.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": question}],
        tools=[{"name": "get_weather", "description": "The weather in a city",
                "input_schema": PARAMETERS}]))
    assert "get_weather" in chat and "strict" not in chat
    assert chat == responses == messages


def test_chat_completions_split_reasoning_whole_and_streamed(fake_server: ThreadServer) -> None:
    client = oai(fake_server)
    messages = [{"role": "user", "content": THOUGHT}]
    whole = client.chat.completions.create(model=MODEL, messages=messages)
    message = whole.choices[0].message
    assert message.content == "Hello there"
    assert message.model_extra["reasoning_content"] == "The user wants a greeting."
    reasoning, content = "", ""
    for chunk in client.chat.completions.create(model=MODEL, messages=messages, stream=True):
        if chunk.choices:
            delta = chunk.choices[0].delta
            reasoning += (delta.model_extra or {}).get("reasoning_content") or ""
            content += delta.content or ""
    assert (reasoning, content) == ("The user wants a greeting.", "Hello there")


def test_text_completions_stay_raw(fake_server: ThreadServer) -> None:
    """A text completion is the text the model wrote, think tags and all."""
    done = oai(fake_server).completions.create(model=MODEL, prompt=THOUGHT)
    assert done.choices[0].text == "<think>The user wants a greeting.</think>\n\nHello there"


def test_local_v1_chat_splits_reasoning_as_a_linked_one_does(fake_server: ThreadServer) -> None:
    body = {"model": MODEL, "input": THOUGHT}
    whole = httpx.post(fake_server.base_url + "/api/v1/chat", json=body, timeout=30).json()
    assert whole["output"] == [
        {"type": "reasoning", "content": "The user wants a greeting."},
        {"type": "message", "content": "Hello there"}]
    assert whole["stats"]["reasoning_output_tokens"] > 0
    with httpx.stream("POST", fake_server.base_url + "/api/v1/chat",
                      json=body | {"stream": True}, timeout=30) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "chat.start" and kinds[-1] == "chat.end"
    assert kinds.index("prompt_processing.end") < kinds.index("reasoning.start") < \
        kinds.index("reasoning.end") < kinds.index("message.start") < kinds.index("message.end")
    said = "".join(e["content"] for e in events if e["type"] == "message.delta")
    thought = "".join(e["content"] for e in events if e["type"] == "reasoning.delta")
    assert (thought, said) == ("The user wants a greeting.", "Hello there")
    assert events[-1]["result"]["output"] == whole["output"]


def test_sdk_fragments_mark_reasoning(fake_server: ThreadServer) -> None:
    """lmscli's predict route (what ``respond()`` reads) marks reasoning fragments as LM
    Studio does: the tags, then the reasoning, apart from the answer."""
    lines = predict_lines(fake_server, THOUGHT)
    fragments = [(m["fragment"]["reasoningType"], m["fragment"]["content"])
                 for m in lines if m["type"] == "fragment"]
    assert fragments[0] == ("reasoningStartTag", "<think>")
    assert "".join(c for kind, c in fragments if kind == "reasoning") == \
        "The user wants a greeting."
    assert ("reasoningEndTag", "</think>") in fragments
    assert "".join(c for kind, c in fragments if kind == "none") == "Hello there"
    assert lines[-1]["type"] == "success"
    assert token_counts_add_up(lines)


def predict_lines(server: ThreadServer, content: str) -> list[dict[str, Any]]:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}]}
    with httpx.stream("POST", server.base_url + "/lmscli/predict", json=body, timeout=30) as r:
        return [json.loads(line) for line in r.iter_lines() if line]


def token_counts_add_up(lines: list[dict[str, Any]]) -> bool:
    """Every token is counted once, with the text it made (tags show as none)."""
    counts = sum(m["fragment"]["tokensCount"] for m in lines if m["type"] == "fragment")
    return counts == lines[-1]["stats"]["predictedTokensCount"]


def test_tokens_held_back_count_with_the_text_that_follows(fake_server: ThreadServer) -> None:
    """Leading whitespace waits to see whether a think block opens; its token is not lost."""
    # one token at a time ([[slow]]), so that the held one arrives alone
    lines = predict_lines(fake_server, "[[slow]] [[reply: \n \nHello there]]")
    assert "".join(m["fragment"]["content"] for m in lines if m["type"] == "fragment") == \
        "\n \nHello there"
    assert token_counts_add_up(lines)
