"""Real Claude Code and Codex sessions, recorded headless (bench/agent_sessions/), replayed
against a real server on the fake engine: every request is answered, and from the second one
on nearly all of each prompt comes from the cache: a resumed session's turn, a new session,
a new session that Claude Code marks with another billing header."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmscli.engine.fake import FakeEngine
from tests.conftest import ThreadServer
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
        else:
            cached = usage["cache_read_input_tokens"]
            total = usage["input_tokens"] + cached
        out.append((f"{req['session']}{req['turn']}", total, cached))
    return out


@pytest.mark.parametrize("name", ["claude_code.json", "codex.json"])
def test_a_recorded_session_is_served_from_the_cache_after_its_first_request(
        agent_server: ThreadServer, name: str) -> None:
    turns = replay(agent_server, name)
    assert turns[0][2] < 10 and turns[0][1] > 1000
    for label, total, cached in turns[1:]:
        # session C begins with another question, before Claude Code's agent list: those
        # two are decoded, its system prompt and tools (and billing header) are not
        assert cached / total >= (0.9 if label == "C1" else 0.95), (label, total, cached)
