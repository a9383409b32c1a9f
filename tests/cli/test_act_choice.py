"""``lms act`` without a model picks one whose chat template supports tools, and says why."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from lmscli.cli.act import AgentModel, choose_agent_model
from lmscli.cli.app import run
from tests.conftest import ThreadServer
from tests.gguf_factory import TOOLS_TEMPLATE, make_gguf


def downloaded(key: str, tools: bool, size: int = 100, kind: str = "llm") -> dict[str, Any]:
    return {"modelKey": key, "trainedForToolUse": tools, "sizeBytes": size, "type": kind}


def loaded(identifier: str, tools: bool) -> dict[str, Any]:
    return {"identifier": identifier, "type": "llm", "trainedForToolUse": tools}


def test_a_loaded_tool_model_comes_first() -> None:
    choice = choose_agent_model([loaded("plain", False), loaded("qwen", True)],
                                [downloaded("other-tools", True)], [])
    assert choice == AgentModel("qwen", True,
                                "it is loaded and its chat template supports tool calls")


def test_then_a_downloaded_one_recent_first_then_smallest() -> None:
    models = [downloaded("big", True, 900), downloaded("small", True, 100),
              downloaded("plain", False, 10), downloaded("embed", True, 1, "embedding")]
    assert choose_agent_model([], models, []).key == "small"  # type: ignore[union-attr]
    choice = choose_agent_model([loaded("plain", False)], models, ["plain", "big"])
    assert choice is not None and (choice.key, choice.loaded) == ("big", False)
    assert "the loaded model's does not" in choice.reason


def test_no_tool_model_means_no_choice() -> None:
    assert choose_agent_model([loaded("plain", False)], [downloaded("x", False)], []) is None


def lms(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def act(capsys: pytest.CaptureFixture[str], tmp_path: Path, reply: str) -> tuple[int, str, str]:
    """``lms act`` with one small tool: the fake models have short contexts."""
    (tmp_path / "tools.py").write_text('def ping() -> str:\n    """Ping."""\n    return "pong"\n')
    return lms(capsys, "act", f"[[reply: {reply}]]", "--no-builtin-tools", "--tools",
               str(tmp_path / "tools.py"), "--json", "-y")


def test_lms_act_loads_the_downloaded_tool_model(fake_server: ThreadServer, fake_models: Path,
                                                 capsys, monkeypatch, tmp_path: Path) -> None:
    make_gguf(fake_models / "test/tool-chat-GGUF/tool-chat.Q4_0.gguf", name="Tool Chat",
              chat_template=TOOLS_TEMPLATE, context_length=256)
    monkeypatch.chdir(tmp_path)
    lms(capsys, "load", "tiny-chat")
    code, out, err = act(capsys, tmp_path, "Nothing to do.")
    assert code == 0, err
    assert "Using tool-chat: its chat template supports tool calls (the loaded model's does " \
           "not)." in err
    assert json.loads(out.splitlines()[0])["model"] == "tool-chat"
    code, out, err = act(capsys, tmp_path, "Still nothing.")
    assert "Using tool-chat: it is loaded and its chat template supports tool calls." in err


def test_lms_act_without_a_tool_model_says_so(fake_server: ThreadServer, capsys,
                                              monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    lms(capsys, "load", "tiny-chat")
    code, out, err = act(capsys, tmp_path, "Hi.")
    assert code == 0, err
    assert "Using tiny-chat: no loaded or downloaded model has a chat template that supports " \
           "tool calls" in err
    assert "lms get qwen2.5-coder-0.5b-instruct" in err
