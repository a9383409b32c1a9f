"""The docs' tool examples on Qwen2.5-Coder 0.5B, a small model trained for tool calls.

It writes its calls as plain JSON in a code fence rather than in <tool_call> tags; these tests
show that every API recovers them. Greedy sampling and small token limits keep them short on
a 2-core machine.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

import lmscli as lms
from lmscli.client import default
from lmscli.prompting.tools import detect_format
from tests.conftest import QWEN_MODEL, QWEN_MODEL_REL, ProcessServer, link_model, read_call_stream
from tests.doc_tools import add, create_file, is_prime, multiply
from tests.server.test_tooluse_real import DELIVERY

pytestmark = pytest.mark.real
GREEDY = {"temperature": 0, "maxTokens": 80}
DATE = "2024-11-19 13:03:17"


@pytest.fixture(scope="module")
def qwen_server(tmp_path_factory: pytest.TempPathFactory,
                qwen_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("qwen-tools-home")
    link_model(home, qwen_model_file, QWEN_MODEL_REL)
    server = ProcessServer(home)
    # a 4k context instead of the trained 32k: the tests' prompts are short, and the KV cache
    # is then 50 MB, not 400
    loaded = server.lms("load", QWEN_MODEL, "-c", "4096", "-y", timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    yield server
    server.stop()


@pytest.fixture
def sdk_env(qwen_server: ProcessServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LMSCLI_HOME", str(qwen_server.home))
    default.reset_default_client()
    yield
    default.reset_default_client()


def client(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="lm-studio", max_retries=0)


def test_the_builtin_download_is_a_tool_model(qwen_model_file: Path) -> None:
    from lmscli.catalog.store import scan_models

    models, _ = scan_models(qwen_model_file.parents[2])
    model = next(m for m in models if m.model_key == QWEN_MODEL)
    assert model.size_bytes == 491_400_064 and model.quantization == "Q4_K_M"
    assert model.max_context_length == 32768 and model.trained_for_tool_use
    assert detect_format(model.chat_template) == "hermes"


DOCS_MESSAGES = [
    {"role": "system", "content": "You are a helpful customer support assistant. Use the "
                                  "supplied tools to assist the user."},
    {"role": "user", "content": "Give me the delivery date and time for order number 1017"}]


def test_docs_delivery_example_two_turns(qwen_server: ProcessServer) -> None:
    """The docs' multi-turn example as written, greedy: the call, then an answer with the date
    the tool returned."""
    c = client(qwen_server)
    response = c.chat.completions.create(model=QWEN_MODEL, messages=DOCS_MESSAGES,
                                         tools=[DELIVERY], temperature=0, max_tokens=80)
    assert response.choices[0].finish_reason == "tool_calls"
    tool_call = response.choices[0].message.tool_calls[0]
    arguments = json.loads(tool_call.function.arguments)
    assert tool_call.function.name == "get_delivery_date"
    assert arguments == {"order_id": "1017"}
    messages = [*DOCS_MESSAGES,
                {"role": "assistant", "tool_calls": [{"id": tool_call.id, "type": tool_call.type,
                                                      "function": tool_call.function}]},
                {"role": "tool", "tool_call_id": tool_call.id, "content": json.dumps(
                    {"order_id": arguments["order_id"], "delivery_date": DATE})}]
    final = c.chat.completions.create(model=QWEN_MODEL, messages=messages, temperature=0,
                                      max_tokens=80)
    assert "2024-11-19" in (final.choices[0].message.content or "")


def test_delivery_call_streams_as_tool_call_deltas(qwen_server: ProcessServer) -> None:
    stream = client(qwen_server).chat.completions.create(
        model=QWEN_MODEL, messages=DOCS_MESSAGES, tools=[DELIVERY], temperature=0,
        max_tokens=80, stream=True)
    text, name, arguments, finish = read_call_stream(stream)
    assert "{" not in text and "```" not in text  # the JSON came as a call, not as text
    assert name == "get_delivery_date" and json.loads(arguments) == {"order_id": "1017"}
    assert finish == "tool_calls"


def test_act_multiply_example_calls_multiply(sdk_env: None) -> None:
    messages: list = []
    lms.llm(QWEN_MODEL).act("What is the result of 12345 multiplied by 54321?", [multiply],
                            on_message=messages.append, max_prediction_rounds=2, config=GREEDY)
    call = messages[0].content[1]["toolCallRequest"]
    assert call["name"] == "multiply" and call["arguments"] == {"a": 12345, "b": 54321}
    assert messages[1].content[0]["content"] == "670592745.0"  # the tool ran


def test_act_add_and_is_prime_example_calls_its_tools(sdk_env: None) -> None:
    # "Think step by step" makes this model reason in text, never calling a tool (see
    # bench/tool_examples.py), so the first round is forced; the call is then its own choice.
    messages: list = []
    lms.llm(QWEN_MODEL).act("Is the result of 12345 + 45668 a prime? Think step by step.",
                            [add, is_prime], on_message=messages.append, tool_choice="required",
                            max_prediction_rounds=2, config=GREEDY)
    call = messages[0].content[1]["toolCallRequest"]
    assert call["name"] in ("add", "is_prime") and messages[1].role == "tool"
    assert messages[1].content[0]["content"] in ("58013", "true", "false")  # the tool ran


def test_act_create_file_chat_loop(sdk_env: None, monkeypatch: pytest.MonkeyPatch,
                                   tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    chat = lms.Chat("You are a task focused AI assistant")
    chat.add_user_message("Create a file named hello.txt that says hi")
    lms.llm(QWEN_MODEL).act(chat, [create_file], on_message=chat.append,
                            max_prediction_rounds=2, config=GREEDY)
    assert (tmp_path / "hello.txt").read_text().lower().startswith("hi")
    assert chat.messages[2]["content"][1]["toolCallRequest"]["name"] == "create_file"


def test_lms_act_picks_the_tool_model_and_lists_files(qwen_server: ProcessServer,
                                                      tmp_path: Path) -> None:
    work = tmp_path / "project"
    (work / "src").mkdir(parents=True)
    (work / "notes.txt").write_text("hi")
    (work / "main.py").write_text("print(1)")
    r = subprocess.run([sys.executable, "-m", "lmscli", "act", "What files are in this "
                        "directory?", "--max-rounds", "2", "--json", "-y", "--temperature", "0"],
                       env=qwen_server.env, capture_output=True, text=True, timeout=300,
                       cwd=work)
    assert r.returncode == 0, r.stderr
    assert QWEN_MODEL in r.stderr and "supports tool" in r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    calls = [e for e in events if e["type"] == "tool_call"]
    assert calls and calls[0]["name"] == "analyze_directory", r.stdout[-600:]
    result = next(e for e in events if e["type"] == "tool_result")
    assert all(name in result["content"] for name in ("main.py", "notes.txt", "src/"))
