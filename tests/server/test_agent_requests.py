"""What coding agents send that other clients don't: Claude Code's system messages in the
middle of ``messages`` and its probe of ``/``, Codex's hosted tools beside its function tools.
Fake engine behind a real server; the official SDKs and raw bodies as the agents send them."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from lmscli.engine.fake import FakeEngine
from lmscli.prompting.tools import fold_system_messages
from tests.conftest import ThreadServer, prediction_logs
from tests.gguf_factory import make_gguf

MODEL = "tiny-chat"
AGENTS = "Available agent types for the Agent tool: general-purpose, Explore"
# a template that, like Gemma's or Llama 2's, takes a system message only first
FIRST_SYSTEM_ONLY = (
    "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
    "{{ raise_exception('System role only first') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def claude_code_body(model: str) -> dict:
    """The shape of Claude Code's first request (2.1.x), cut down."""
    return {"model": model, "max_tokens": 20, "stream": True,
            "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1"},
                       {"type": "text", "text": "You are Claude Code.",
                        "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]},
                         {"role": "system", "content": AGENTS}],
            "thinking": {"type": "adaptive"}, "metadata": {"user_id": "u"},
            "context_management": {"edits": []}, "output_config": {"effort": "low"}}


def prompt_of(server: ThreadServer, ask: object) -> str:
    given, _ = prediction_logs(server.base_url, 2, ask)  # type: ignore[arg-type]
    return given["input"]


def test_a_system_message_mid_conversation_is_rendered_in_place(
        fake_server: ThreadServer) -> None:
    url = fake_server.base_url + "/v1/messages?beta=true"
    headers = {"anthropic-beta": "mid-conversation-system-2026-04-07"}

    def ask() -> None:
        with httpx.stream("POST", url, json=claude_code_body(MODEL), headers=headers,
                          timeout=30) as r:
            assert r.status_code == 200
            assert "message_stop" in r.read().decode()

    prompt = prompt_of(fake_server, ask)
    assert prompt.index("Say hi.") < prompt.index(f"<|im_start|>system\n{AGENTS}")
    count = anthropic.Anthropic(base_url=fake_server.base_url, api_key="x",
                                max_retries=0).messages.count_tokens(
        model=MODEL, messages=claude_code_body(MODEL)["messages"])
    assert count.input_tokens > len(AGENTS.split())


def test_a_template_that_refuses_it_gets_it_folded_into_a_user_turn(
        fake_models: Path) -> None:
    make_gguf(fake_models / "test/strict-chat-GGUF/strict-chat.Q4_0.gguf", context_length=512,
              chat_template=FIRST_SYSTEM_ONLY)
    server = ThreadServer(FakeEngine())
    try:
        def ask() -> None:
            body = claude_code_body("strict-chat") | {"stream": False}
            r = httpx.post(server.base_url + "/v1/messages", json=body, timeout=30)
            assert r.status_code == 200, r.text

        prompt = prompt_of(server, ask)
        assert prompt.count("<|im_start|>system") == 1
        assert f"Say hi.\n\n{AGENTS}<|im_end|>" in prompt
        # chat completions take system messages anywhere too, and fold them the same way
        chat = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0)
        assert chat.chat.completions.create(model="strict-chat", messages=[
            {"role": "user", "content": "hi"}, {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Now?"}]).choices[0].message.content
    finally:
        server.stop()


def test_folding_keeps_the_turns_before_it() -> None:
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"}, {"role": "system", "content": "T"},
                {"role": "user", "content": "c"}]
    assert fold_system_messages(messages) == [
        *messages[:3], {"role": "user", "content": "T\n\nc"}]
    at_the_end = [{"role": "user", "content": "a"}, {"role": "system", "content": "T"}]
    assert fold_system_messages(at_the_end) == [{"role": "user", "content": "a\n\nT"}]
    assert fold_system_messages(messages[:3]) == messages[:3]


def test_hosted_tools_are_left_out_not_refused(fake_server: ThreadServer) -> None:
    """Codex offers web_search beside its function tools: the model gets the functions."""
    client = openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="x", max_retries=0)
    tools = [{"type": "web_search", "external_web_access": False},
             {"type": "function", "name": "shell", "description": "Run a command",
              "parameters": {"type": "object", "properties": {"cmd": {"type": "string"}}},
              "strict": False}]
    prompt = prompt_of(fake_server, lambda: client.responses.create(
        model=MODEL, input="hi", tools=tools, store=False, reasoning={"effort": "low"},
        include=["reasoning.encrypted_content"], prompt_cache_key="k"))
    assert "shell" in prompt and "web_search" not in prompt


def test_the_root_answers_probes(fake_server: ThreadServer) -> None:
    assert httpx.head(fake_server.base_url + "/").status_code == 200
    assert httpx.get(fake_server.base_url + "/").text == "lmscli is running"


def test_claude_codes_billing_header_stays_out_of_the_prompt(
        fake_server: ThreadServer) -> None:
    """Its value changes between sessions; first in the prompt, it would make each new session
    process the whole system prompt and tool list again instead of finding them cached."""
    prompts = []
    for version in ("2.1.197.38b", "2.1.197.1c0; cch=5f0e2"):
        body = claude_code_body(MODEL) | {"stream": False}
        body["system"][0]["text"] = (f"x-anthropic-billing-header: cc_version={version}; "
                                     "cc_entrypoint=sdk-cli;")

        def ask(body: dict = body) -> None:
            r = httpx.post(fake_server.base_url + "/v1/messages", json=body, timeout=30)
            assert r.status_code == 200

        prompts.append(prompt_of(fake_server, ask))
    assert prompts[0] == prompts[1]
    assert "billing" not in prompts[0] and "You are Claude Code." in prompts[0]


SPAWN_CALL = ('[TOOL_REQUEST]{"name": "multi_agent_v1.spawn_agent", '
              '"arguments": {"task": "lint"}}[END_TOOL_REQUEST]')
NAMESPACE = {"type": "namespace", "name": "multi_agent_v1",
             "description": "Tools for spawning and managing sub-agents.",
             "tools": [{"type": "function", "name": "spawn_agent", "description": "Spawn one.",
                        "strict": False, "parameters": {
                            "type": "object", "properties": {"task": {"type": "string"}},
                            "required": ["task"], "additionalProperties": False}}]}


def test_namespace_tools_are_offered_and_called_in_their_namespace(
        fake_server: ThreadServer) -> None:
    """Codex groups its sub-agent tools in a namespace: the model sees them by a qualified
    name, and Codex gets its calls back with ``namespace`` and the tool's own name."""
    client = openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="x", max_retries=0)
    ask = f"Start a linter. [[reply: {SPAWN_CALL}]]"
    prompt = prompt_of(fake_server, lambda: client.responses.create(
        model=MODEL, input=ask, tools=[NAMESPACE], store=False))
    assert "multi_agent_v1.spawn_agent" in prompt
    assert "Tools for spawning and managing sub-agents." in prompt
    for stream in (False, True):
        if stream:
            events = list(client.responses.create(model=MODEL, input=ask, tools=[NAMESPACE],
                                                  stream=True))
            done = [e for e in events if e.type == "response.function_call_arguments.done"]
            assert done and done[0].name == "spawn_agent"
            response = next(e.response for e in events if e.type == "response.completed")
        else:
            response = client.responses.create(model=MODEL, input=ask, tools=[NAMESPACE])
        (call,) = [item for item in response.output if item.type == "function_call"]
        assert (call.namespace, call.name, json.loads(call.arguments)) == (
            "multi_agent_v1", "spawn_agent", {"task": "lint"})
    # the call comes back in the next request's input, as Codex sends it
    follow = [{"type": "message", "role": "user", "content": "Start a linter."},
              {"type": "function_call", "call_id": call.call_id, "name": "spawn_agent",
               "namespace": "multi_agent_v1", "arguments": call.arguments},
              {"type": "function_call_output", "call_id": call.call_id, "output": "agent 7"}]
    prompt = prompt_of(fake_server, lambda: client.responses.create(
        model=MODEL, input=follow, tools=[NAMESPACE], store=False))
    assert '"name": "multi_agent_v1.spawn_agent"' in prompt and "agent 7" in prompt


PATCH = "*** Begin Patch\n*** Add File: hello.txt\n+hi\n*** End Patch\n"
PATCH_CALL = ("[TOOL_REQUEST]" + json.dumps({"name": "apply_patch",
                                             "arguments": {"input": PATCH}})
              + "[END_TOOL_REQUEST]")
APPLY_PATCH = {"type": "custom", "name": "apply_patch",
               "description": "Use this tool to edit files.",
               "format": {"type": "grammar", "syntax": "lark", "definition": (
                   'start: "*** Begin Patch" LF hunk+ "*** End Patch" LF?\n'
                   'hunk: "*** Add File: " /(.+)/ LF ("+" /(.*)/ LF)+\n'
                   "%import common.LF")}}


def test_custom_tools_are_offered_with_one_text_input_and_called_back_as_custom_calls(
        fake_server: ThreadServer) -> None:
    """Codex's freeform tools (apply_patch): the model calls them as a function of one
    string; the client gets a custom_tool_call with that string as its input."""
    client = openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="x", max_retries=0)
    ask = f"Add hello.txt. [[reply: {PATCH_CALL}]]"
    prompt = prompt_of(fake_server, lambda: client.responses.create(
        model=MODEL, input=ask, tools=[APPLY_PATCH], store=False))
    assert '"name": "apply_patch"' in prompt and '"input"' in prompt
    assert "*** Begin Patch" in prompt  # the grammar is in the input's description
    whole = client.responses.create(model=MODEL, input=ask, tools=[APPLY_PATCH])
    (call,) = whole.output
    assert (call.type, call.name, call.input) == ("custom_tool_call", "apply_patch", PATCH)
    assert call.id.startswith("ctc_") and call.call_id
    events = list(client.responses.create(model=MODEL, input=ask, tools=[APPLY_PATCH],
                                          stream=True))
    deltas = [e.delta for e in events if e.type == "response.custom_tool_call_input.delta"]
    done = [e.input for e in events if e.type == "response.custom_tool_call_input.done"]
    assert "".join(deltas) == PATCH and done == [PATCH]
    assert not [e for e in events if e.type.startswith("response.function_call")]
    final = next(e.response for e in events if e.type == "response.completed")
    assert final.output[0].type == "custom_tool_call" and final.output[0].input == PATCH
    # the call and its output come back in the next request's input
    follow = [{"type": "message", "role": "user", "content": "Add hello.txt."},
              {"type": "custom_tool_call", "call_id": call.call_id, "name": "apply_patch",
               "input": PATCH},
              {"type": "custom_tool_call_output", "call_id": call.call_id,
               "output": "Done: A hello.txt"}]
    prompt = prompt_of(fake_server, lambda: client.responses.create(
        model=MODEL, input=follow, tools=[APPLY_PATCH], store=False))
    assert json.dumps({"input": PATCH}) in prompt and "Done: A hello.txt" in prompt


def test_a_custom_tool_can_be_forced_and_live_in_a_namespace(fake_server: ThreadServer) -> None:
    client = openai.OpenAI(base_url=fake_server.base_url + "/v1", api_key="x", max_retries=0)
    spaced = {"type": "namespace", "name": "files", "description": "File tools.",
              "tools": [APPLY_PATCH]}
    reply = PATCH_CALL.replace('"apply_patch"', '"files.apply_patch"')
    response = client.responses.create(
        model=MODEL, input=f"Add it. [[reply: {reply}]]", tools=[spaced],
        tool_choice={"type": "custom", "name": "apply_patch", "namespace": "files"})  # type: ignore[arg-type,typeddict-unknown-key]
    (call,) = response.output
    assert (call.type, call.namespace, call.name, call.input) == (
        "custom_tool_call", "files", "apply_patch", PATCH)


@pytest.mark.parametrize("fmt, param", [
    ({"type": "grammar", "syntax": "lark", "definition": "start: undefined"},
     "tools[0].format.definition"),
    ({"type": "grammar", "syntax": "lark", "definition": "start: /a/i"},
     "tools[0].format.definition"),
    ({"type": "grammar", "syntax": "peg", "definition": "x"}, "tools[0].format.syntax"),
    ({"type": "json"}, "tools[0].format.type"),
])
def test_a_custom_tool_grammar_the_server_cannot_follow_is_a_400(
        fake_server: ThreadServer, fmt: dict, param: str) -> None:
    tool = {"type": "custom", "name": "apply_patch", "format": fmt}
    r = httpx.post(fake_server.base_url + "/v1/responses", timeout=30,
                   json={"model": MODEL, "input": "hi", "tools": [tool]})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
