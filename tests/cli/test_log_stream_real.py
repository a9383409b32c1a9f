"""``lms log stream``'s events from a real server running the default model: the docs' tool
request (lmstudio docs, tool use, "lms log stream" example) shows its exact prompt."""

from __future__ import annotations

import queue
import threading
import time
from typing import Any

import httpx
import pytest

from lmscli.client.logs import stream_logs
from tests.conftest import DEFAULT_MODEL_REL, ProcessServer
from tests.doc_tools import SEARCH_PRODUCTS

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"
QUESTION = "What dell products do you have under $50 in electronics?"
TOOLS = [SEARCH_PRODUCTS]


class Captured:
    def __init__(self, events: list[dict[str, Any]], response: dict[str, Any]) -> None:
        self.events = events
        self.response = response

    def one(self, kind: str) -> dict[str, Any]:
        found = [e["data"] for e in self.events if e["data"]["type"] == kind]
        assert len(found) == 1, (kind, found)
        return found[0]


def subscribe(base_url: str) -> queue.Queue[dict[str, Any]]:
    """A reader on its own thread; returns once the server has attached it."""
    messages: queue.Queue[dict[str, Any]] = queue.Queue()

    def read() -> None:
        for message in stream_logs(base_url):
            messages.put(message)

    threading.Thread(target=read, daemon=True).start()  # ends when the server stops
    assert messages.get(timeout=10)["type"] == "subscribed"
    return messages


@pytest.fixture(scope="module")
def captured(real_server: ProcessServer) -> Captured:
    messages = subscribe(real_server.base_url)
    # the docs' curl body; max_tokens and temperature only keep the test short and stable
    body = {"model": MODEL, "messages": [{"role": "user", "content": QUESTION}],
            "tools": TOOLS, "max_tokens": 48, "temperature": 0}
    r = httpx.post(real_server.base_url + "/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    # the request's own line comes once its response has ended: the last of its events
    while not any(e["data"]["type"] == "server.log" for e in events):
        message = messages.get(timeout=max(0.01, deadline - time.monotonic()))
        assert message["type"] == "log", message
        events.append(message["log"])
    return Captured(events, r.json())


def test_input_is_the_templated_prompt_and_output_follows_with_stats(
        captured: Captured) -> None:
    kinds = [e["data"]["type"] for e in captured.events]
    assert kinds.index("llm.prediction.input") < kinds.index("llm.prediction.output") \
        < kinds.index("server.log")
    given = captured.one("llm.prediction.input")
    assert given["modelIdentifier"] == MODEL
    assert given["modelPath"] == DEFAULT_MODEL_REL
    assert f"<|im_start|>user\n{QUESTION}<|im_end|>\n" in given["input"]
    assert given["input"].endswith("<|im_start|>assistant\n")

    produced = captured.one("llm.prediction.output")
    usage = captured.response["usage"]
    assert produced["modelIdentifier"] == MODEL
    assert produced["output"].strip()
    stats = produced["stats"]
    assert stats["stopReason"] in ("eosFound", "maxPredictedTokensReached", "toolCalls")
    assert stats["tokensPerSecond"] > 0
    assert stats["promptTokensCount"] == usage["prompt_tokens"]
    assert stats["predictedTokensCount"] == usage["completion_tokens"]
    assert list(stats)[:2] == ["stopReason", "tokensPerSecond"]  # the order lms prints


def test_loads_and_requests_are_logged(captured: Captured) -> None:
    runtime = [e["data"] for e in captured.events if e["data"]["type"] == "runtime.log"]
    assert [r["message"].split()[0] for r in runtime] == ["Loading", "Loaded"]  # JIT load
    assert {r["engineName"] for r in runtime} == {"llama.cpp"}
    assert all(r["modelIdentifier"] == MODEL and r["engineType"] == "llm" for r in runtime)
    line = captured.one("server.log")
    assert line["content"].startswith("POST /v1/chat/completions 200 ")
    assert line["content"].endswith(f" model={MODEL}") and line["level"] == "info"


def test_input_holds_the_default_tool_prompt(captured: Captured) -> None:
    given = captured.one("llm.prediction.input")["input"]
    assert "[TOOL_REQUEST]" in given
    assert "AVAILABLE TOOLS:" in given
    assert '"name": "search_products"' in given
    # the tool prompt goes into the system turn, before the user's question
    assert given.index("AVAILABLE TOOLS:") < given.index(QUESTION)
