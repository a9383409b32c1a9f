"""Tool use on the real default model: the docs' OpenAI examples, the native <tool_call>
path, act(), and lms act."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pexpect
import pytest

import lmscli as lms
from lmscli.client import default
from tests.conftest import ProcessServer
from tests.doc_tools import add, docs_act_loop, is_prime, multiply

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"

SAY_HELLO = {"type": "function", "function": {
    "name": "say_hello", "description": "Says hello to someone",
    "parameters": {"type": "object", "properties": {
        "name": {"type": "string", "description": "The person's name"}}, "required": ["name"]}}}
DELIVERY = {"type": "function", "function": {
    "name": "get_delivery_date",
    "description": "Get the delivery date for a customer's order. Call this whenever you need "
                   "to know the delivery date, for example when a customer asks 'Where is my "
                   "package'",
    "parameters": {"type": "object", "properties": {
        "order_id": {"type": "string", "description": "The customer's order ID."}},
        "required": ["order_id"], "additionalProperties": False}}}
AGENT_TOOLS = [
    {"type": "function", "function": {
        "name": "open_safe_url", "description": "Open a URL in the browser if it is deemed safe",
        "parameters": {"type": "object", "properties": {
            "url": {"type": "string", "description": "The URL to open"}}, "required": ["url"]}}},
    {"type": "function", "function": {
        "name": "get_current_time", "description": "Get the current system time with timezone",
        "parameters": {"type": "object", "properties": {}, "required": []}}},
    {"type": "function", "function": {
        "name": "analyze_directory", "description": "Analyze the contents of a directory",
        "parameters": {"type": "object", "properties": {"path": {
            "type": "string", "description": "The directory path", "default": "."}},
            "required": []}}},
]
QWEN_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{%- else %}You are a helpful assistant.{%- endif %}\n\n# Tools\n\nYou may call one or "
    "more functions to assist with the user query.\n\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\n<tools>"
    "{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n\nFor each function "
    "call, return a json object with function name and arguments within <tool_call>"
    "</tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\n</tool_call><|im_end|>\n{%- endif %}"
    "{%- for message in messages %}{%- if message.role == 'system' and tools %}"
    "{%- elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message.content }}\n</tool_response><|im_end|>\n"
    "{%- elif message.tool_calls %}<|im_start|>assistant\n"
    "{%- for tc in message.tool_calls %}<tool_call>\n{\"name\": \"{{ tc.function.name }}\", "
    "\"arguments\": {{ tc.function.arguments | tojson }}}\n</tool_call>{%- endfor %}"
    "<|im_end|>\n{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}"
    "<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")


@pytest.fixture(scope="module", autouse=True)
def bounded(real_server: ProcessServer) -> None:
    real_server.load_default(2048)  # room for the tools' prompts, not for minutes of talk


def client(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="lm-studio", max_retries=0)


# -- the docs' OpenAI examples ----------------------------------------------------------------

def test_single_turn_say_hello(real_server: ProcessServer) -> None:
    response = client(real_server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Can you say hello to Bob the "
                                                           "Builder?"}],
        tools=[SAY_HELLO], tool_choice="required", temperature=0)
    assert response.choices[0].finish_reason == "tool_calls"
    tool_call = response.choices[0].message.tool_calls[0]
    assert tool_call.function.name == "say_hello"
    name = json.loads(tool_call.function.arguments)["name"]
    assert isinstance(name, str) and name


def test_multi_turn_with_a_tool_result(real_server: ProcessServer) -> None:
    c = client(real_server)
    messages = [
        {"role": "system", "content": "You are a helpful customer support assistant. Use the "
                                      "supplied tools to assist the user."},
        {"role": "user", "content": "Give me the delivery date and time for order number "
                                    "1017"}]
    forced = {"type": "function", "function": {"name": "get_delivery_date"}}
    response = c.chat.completions.create(model=MODEL, messages=messages, tools=[DELIVERY],
                                         temperature=0, tool_choice=forced)
    tool_call = response.choices[0].message.tool_calls[0]
    arguments = json.loads(tool_call.function.arguments)
    assert tool_call.function.name == "get_delivery_date" and "order_id" in arguments
    messages += [{"role": "assistant", "tool_calls": [{"id": tool_call.id, "type":
                                                       tool_call.type,
                                                       "function": tool_call.function}]},
                 {"role": "tool", "content": json.dumps({"order_id": "1017",
                                                         "delivery_date": "2024-03-15"}),
                  "tool_call_id": tool_call.id}]
    final = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=60,
                                      temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def test_three_tool_agent_round(real_server: ProcessServer) -> None:
    response = client(real_server).chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "You are a helpful assistant that "
                                "can open safe web links, tell the current time, and analyze "
                                "directory contents."},
                               {"role": "user", "content": "What time is it?"}],
        tools=AGENT_TOOLS, tool_choice="required")
    names = {tc.function.name for tc in response.choices[0].message.tool_calls}
    assert names <= {"open_safe_url", "get_current_time", "analyze_directory"} and names


def test_streaming_accumulator(real_server: ProcessServer) -> None:
    stream = client(real_server).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Tell me the current time"}],
        tools=[AGENT_TOOLS[1]], tool_choice="required", stream=True, temperature=0.2)
    tool_calls: list[dict] = []
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:
            if len(tool_calls) <= tc.index:
                tool_calls.append({"id": "", "function": {"name": "", "arguments": ""}})
            entry = tool_calls[tc.index]
            entry["id"] += tc.id or ""
            entry["function"]["name"] += tc.function.name or ""
            entry["function"]["arguments"] += tc.function.arguments or ""
    assert tool_calls and tool_calls[0]["function"]["name"] == "get_current_time"
    assert tool_calls[0]["id"] and isinstance(json.loads(tool_calls[0]["function"]["arguments"]),
                                              dict)


# -- the native path: a tool-aware Qwen-style template --------------------------------------

def add_smol_qwen(home: Path, default_model_file: Path) -> None:
    """``smol-qwen``: the default model with a Hermes/Qwen tool template, for the native
    ``<tool_call>`` path (SmolLM2's own template has no tools)."""
    template = home / "template.jinja"
    template.write_text(QWEN_TEMPLATE)
    target = home / "models/test/smol-qwen-GGUF/smol-qwen.Q4_1.gguf"
    target.parent.mkdir(parents=True)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_new_metadata",
                    str(default_model_file), str(target), "--chat-template-file",
                    str(template), "--force"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory: pytest.TempPathFactory,
                default_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("qwen-home")
    add_smol_qwen(home, default_model_file)
    server = ProcessServer(home)
    yield server
    server.stop()


def test_native_tool_call_parsed_whole_and_streamed(qwen_server: ProcessServer) -> None:
    c = client(qwen_server)
    kwargs = {"model": "smol-qwen", "tools": [SAY_HELLO], "tool_choice": "required",
              "messages": [{"role": "user", "content": "Say hello to Alice"}],
              "temperature": 0, "seed": 1}  # greedy: both requests must agree
    whole = c.chat.completions.create(**kwargs)
    (call,) = whole.choices[0].message.tool_calls
    assert call.function.name == "say_hello" and "name" in json.loads(call.function.arguments)
    assert whole.choices[0].finish_reason == "tool_calls"
    streamed = [ch for ch in c.chat.completions.create(**kwargs, stream=True)]
    deltas = [tc for ch in streamed for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "say_hello" and deltas[0].id
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert json.loads(arguments) == json.loads(call.function.arguments)
    models = {m["id"]: m for m in __import__("httpx").get(
        qwen_server.base_url + "/api/v0/models").json()["data"]}
    assert models["smol-qwen"].get("capabilities") == ["tool_use"]


# -- act() and lms act -----------------------------------------------------------------------

@pytest.fixture
def sdk_env(real_server: ProcessServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LMSCLI_HOME", str(real_server.home))
    default.reset_default_client()
    yield
    default.reset_default_client()


def test_act_docs_example_with_a_forced_round(sdk_env: None) -> None:
    messages: list = []
    model = lms.llm(MODEL)
    result = model.act("What is the result of 12345 multiplied by 54321?", [multiply],
                       on_message=messages.append, tool_choice="required",
                       max_prediction_rounds=3)
    assert result.rounds >= 2
    call = messages[0].content[1]["toolCallRequest"]
    assert call["name"] == "multiply"
    assert messages[1].role == "tool"
    assert messages[-1].role == "assistant"


def test_act_docs_example_as_written(sdk_env: None, capsys) -> None:
    model = lms.llm(MODEL)
    result = model.act("What is the result of 12345 multiplied by 54321?", [multiply],
                       on_message=print, max_prediction_rounds=4)
    assert result.rounds >= 1 and "AssistantResponse" in capsys.readouterr().out


def test_lms_act_json_events(real_server: ProcessServer, tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lmscli", "act", MODEL, "What time is it now?",
                        "--tool-choice", "required", "--max-rounds", "2", "--json", "-y"],
                       env=real_server.env, capture_output=True, text=True, timeout=180,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    kinds = [e["type"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "final"
    assert "tool_call" in kinds and "tool_result" in kinds
    call = next(e for e in events if e["type"] == "tool_call")
    assert call["round"] == 0 and call["name"] in events[0]["tools"]
    assert events[-1]["rounds"] == 2


def test_lms_act_asks_before_a_writing_tool(real_server: ProcessServer, tmp_path: Path,
                                            default_model_file: Path) -> None:
    (tmp_path / "notes.py").write_text(
        'from pathlib import Path\n\n\ndef write_note(text: str) -> str:\n'
        '    """Write a note to note.txt."""\n    Path("note.txt").write_text(text)\n'
        '    return "saved"\n\n\nwrite_note.lms_writes = True\n')
    env = real_server.env | {"TERM": "xterm"}
    child = pexpect.spawn(sys.executable, ["-m", "lmscli", "act", MODEL,
                                           "Write a note saying hi", "--no-builtin-tools",
                                           "--tools", "notes.py", "--tool-choice", "required",
                                           "--max-rounds", "2"],
                          env=env, cwd=str(tmp_path), encoding="utf-8", timeout=120)
    child.expect(r"Allow write_note\(")
    child.sendline("y")
    child.expect("saved")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    assert (tmp_path / "note.txt").exists()


def test_lms_act_without_a_tty_denies_writing_tools(real_server: ProcessServer,
                                                     tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-m", "lmscli", "act", MODEL, "Create a file x.txt "
                        "containing hi", "--tool-choice", "required", "--max-rounds", "2",
                        "--json"], env=real_server.env, capture_output=True, text=True,
                       timeout=180, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    results = [json.loads(x) for x in r.stdout.splitlines() if '"tool_result"' in x]
    writes = [e for e in results if e["name"] == "create_file"]
    assert all("Denied" in e["content"] for e in writes)
    assert [p.name for p in tmp_path.iterdir()] == ["home"]  # nothing was written


def test_act_docs_example_add_and_is_prime(sdk_env: None, capsys) -> None:
    model = lms.llm(MODEL)
    model.act("Is the result of 12345 + 45668 a prime? Think step by step.",
              [add, is_prime], on_message=print)
    assert "AssistantResponse" in capsys.readouterr().out


def test_act_docs_create_file_chat_loop(sdk_env: None, monkeypatch, tmp_path: Path,
                                        capsys) -> None:
    import builtins

    monkeypatch.chdir(tmp_path)
    answers = iter(["Create a file named hello.txt that says hi", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))

    chat = docs_act_loop(lms)
    assert capsys.readouterr().out.startswith("Bot: ")
    assert [m["role"] for m in chat.messages][:3] == ["system", "user", "assistant"]
    assert chat.messages[-1]["role"] == "assistant"
