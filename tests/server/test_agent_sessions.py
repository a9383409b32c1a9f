"""Real Claude Code, Codex and OpenCode sessions, recorded headless (bench/agent_sessions/),
replayed against a real server on the fake engine: every request is answered, the model sees
every tool the agent offers that can run here, and from the second request on nearly all of
each prompt comes from the cache: a resumed session's turn, a new session, a new session that
Claude Code marks with another billing header."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmscli.engine.fake import FakeEngine
from tests.conftest import ThreadServer, prediction_logs
from tests.gguf_factory import make_gguf

SESSIONS = Path(__file__).parents[2] / "bench" / "agent_sessions"
MODEL = "agent-model"


@pytest.fixture
def agent_server(home: Path) -> Iterator[ThreadServer]:
    make_gguf(home / "models/test/agent-model-GGUF/agent-model.Q4_0.gguf", name="Agent",
              context_length=65536)
    server = ThreadServer(FakeEngine(), reap_every_s=0.1)
    yield server
    server.stop()


def replay(server: ThreadServer, name: str) -> list[tuple[str, int, int]]:
    """(session and turn, prompt tokens, cached tokens) of each recorded request."""
    recorded = json.loads((SESSIONS / name).read_text())
    api, out = recorded["api"], []
    for req in recorded["requests"]:
        body: dict[str, Any] = dict(req["body"], model=MODEL, stream=False)
        r = httpx.post(server.base_url + api, json=body, timeout=60)
        assert r.status_code == 200, r.text[:300]
        usage = r.json()["usage"]
        if api == "/v1/responses":
            total = usage["input_tokens"]
            cached = usage["input_tokens_details"]["cached_tokens"]
        elif api == "/v1/chat/completions":
            total = usage["prompt_tokens"]
            cached = usage["prompt_tokens_details"]["cached_tokens"]
        else:
            cached = usage["cache_read_input_tokens"]
            total = usage["input_tokens"] + cached
        out.append((f"{req['session']}{req['turn']}", total, cached))
    return out


RECORDED = ["claude_code.json", "codex.json", "opencode.json"]


def offered_tools(tools: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """(the names the model should see, the hosted tools it should not) of an agent's tools,
    in any of the three APIs' shapes."""
    names, hosted = [], []
    for tool in tools:
        kind = tool.get("type", "function")
        if kind == "namespace":
            names += [f"{tool['name']}.{inner['name']}" for inner in tool["tools"]]
        elif kind in ("function", "custom"):
            names.append(tool["function"]["name"] if "function" in tool else tool["name"])
        elif "input_schema" in tool:  # Anthropic's shape has no type
            names.append(tool["name"])
        else:
            hosted.append(kind)
    return names, hosted


@pytest.mark.parametrize("name", RECORDED)
def test_the_model_sees_every_tool_the_agent_offers(agent_server: ThreadServer,
                                                    name: str) -> None:
    recorded = json.loads((SESSIONS / name).read_text())
    body = dict(recorded["requests"][0]["body"], model=MODEL, stream=False)
    names, hosted = offered_tools(body["tools"])
    assert len(names) >= 8

    def ask() -> None:
        r = httpx.post(agent_server.base_url + recorded["api"], json=body, timeout=60)
        assert r.status_code == 200, r.text[:300]

    (given, *_) = prediction_logs(agent_server.base_url, 2, ask)
    prompt = given["input"]
    for tool in names:
        assert f'"{tool}"' in prompt, tool
    for kind in hosted:
        assert f'"{kind}"' not in prompt, kind


@pytest.mark.parametrize("name", RECORDED)
def test_a_recorded_session_is_served_from_the_cache_after_its_first_request(
        agent_server: ThreadServer, name: str) -> None:
    turns = replay(agent_server, name)
    assert turns[0][2] < 10 and turns[0][1] > 1000
    for label, total, cached in turns[1:]:
        # session C begins with another question, before Claude Code's agent list: those
        # two are decoded, its system prompt and tools (and billing header) are not
        assert cached / total >= (0.9 if label == "C1" else 0.95), (label, total, cached)
