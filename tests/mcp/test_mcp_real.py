"""An MCP server's tool called by a real model: Qwen2.5-Coder 0.5B through ``lms act --mcp``,
greedy, with the test MCP server (``tests/mcp/server.py``) over stdio."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from lmscli.mcpservers import config
from lmscli.mcpservers.config import ServerSpec
from tests.conftest import QWEN_MODEL, QWEN_MODEL_REL, ProcessServer, link_model
from tests.mcp.test_mcp import SERVER, children_running

pytestmark = pytest.mark.real


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           qwen_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("mcp-home")
    link_model(home, qwen_model_file, QWEN_MODEL_REL)
    config.add(ServerSpec("calc", sys.executable, [SERVER]), home / "mcp.json")
    server = ProcessServer(home)
    assert server.lms("load", QWEN_MODEL, "-c", "4096", "-y", timeout=300).returncode == 0
    yield server
    server.stop()


def test_lms_act_calls_an_mcp_tool_and_answers_with_its_result(server: ProcessServer) -> None:
    r = server.lms("act", QWEN_MODEL, "What is 1234 plus 4321? Use the add tool.",
                   "--mcp", "calc", "--no-builtin-tools", "--json", "--temperature", "0",
                   "--max-rounds", "3", timeout=300)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert {"add", "write_note", "secret_word"} <= set(events[0]["tools"])
    calls = [e for e in events if e["type"] == "tool_call"]
    results = [e for e in events if e["type"] == "tool_result"]
    assert calls and calls[0]["name"] == "add"
    assert "5555" in json.dumps(results[0])
    assert "5555" in events[-1]["content"].replace(",", ""), r.stdout
    assert not children_running()


def test_v1_chat_runs_the_tool_loop_with_an_mcp_server(server: ProcessServer) -> None:
    r = httpx.post(server.base_url + "/api/v1/chat", timeout=300, json={
        "model": QWEN_MODEL, "input": "What is 1234 plus 4321? Use the add tool.",
        "system_prompt": "Use the available tools when they help, then answer concisely.",
        "integrations": [{"type": "plugin", "id": "mcp/calc", "allowed_tools": ["add"]}],
        "temperature": 0, "max_output_tokens": 120})
    assert r.status_code == 200, r.text
    output = r.json()["output"]
    calls = [i for i in output if i["type"] == "tool_call"]
    assert calls and calls[0]["tool"] == "add" and calls[0]["output"] == "5555"
    assert calls[0]["provider_info"] == {"type": "plugin", "plugin_id": "mcp/calc"}
    # the answer after it is the model's to write: a 0.5B model often writes the call
    # again (a repeated call is answered once more, then the model gets no tools)
    assert output[-1]["type"] == "message", output
    assert len(children_running()) == 1  # mcp.json's server is kept for the next request
