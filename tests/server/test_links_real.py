"""Linked engines with the real default model: a front lmscli server (its own home, no
models) linked to another lmscli server and to llama-cpp-python's own OpenAI server
(``llama_cpp.server``, a third-party engine), both serving the default model under the same
key, so that it is one model with two replicas. Short answers, temperature 0."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import lmscli as lms
from lmscli.client import default
from tests.conftest import ProcessServer, free_port, wait_for

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"
LINKS = ("lmscli", "llamacpp")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
FORCE_WEATHER = {"type": "function", "function": {"name": "get_weather"}}


class LlamaCppServer:
    """``python -m llama_cpp.server`` on the default model, named as lmscli names it."""

    def __init__(self, model: Path, log: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "wb")  # noqa: SIM115
        # chatml-function-calling: its format that honours tools and tool_choice.
        # --interrupt_requests False: by default it ends a running stream whenever another
        # request arrives, and the front's model listing (GET /v1/models) is one.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias",
             MODEL, "--port", str(self.port), "--n_ctx", "2048", "--chat_format",
             "chatml-function-calling", "--interrupt_requests", "False"],
            stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.base_url + "/v1/models", timeout=60)
        # With the sse-starlette releases pip picks today, this server's first streamed
        # answer stalls until a keep-alive ping ends it; a whole answer first avoids that.
        httpx.post(self.base_url + "/v1/chat/completions", timeout=60, json={
            "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def llamacpp(tmp_path_factory: pytest.TempPathFactory,
             default_model_file: Path) -> Iterator[LlamaCppServer]:
    server = LlamaCppServer(default_model_file,
                            tmp_path_factory.mktemp("llamacpp") / "server.log")
    yield server
    server.kill()


@pytest.fixture(scope="module")
def front(tmp_path_factory: pytest.TempPathFactory, real_server: ProcessServer,
          llamacpp: LlamaCppServer) -> Iterator[ProcessServer]:
    real_server.load_default(2048)  # as llama_cpp.server's: `lms chat` below sets no limit
    server = ProcessServer(tmp_path_factory.mktemp("front-home"))
    for name, url in zip(LINKS, (real_server.base_url, llamacpp.base_url), strict=True):
        done = server.lms("link", "add", name, url)
        assert done.returncode == 0 and f"Linked {name}" in done.stderr, done.stderr
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def fresh_default_client() -> Iterator[None]:
    default.reset_default_client()
    yield


def sdk(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0,
                         timeout=120)


def ask(server: ProcessServer, model: str, content: str = "What is the capital of France?",
        **kw: Any) -> Any:
    return sdk(server).chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], temperature=0,
        max_tokens=kw.pop("max_tokens", 8), **kw)


def links(front: ProcessServer) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in
            httpx.get(front.base_url + "/lmscli/links", timeout=10).json()["links"]}


def test_one_model_two_replicas_in_the_listings(front: ProcessServer) -> None:
    assert {"id": MODEL, "object": "model", "owned_by": "lmscli, llamacpp"} in \
        httpx.get(front.base_url + "/v1/models").json()["data"]
    ps = front.lms("ps")
    assert ps.returncode == 0
    assert ps.stdout.splitlines()[1].split()[-2:] == ["lmscli,", "llamacpp"]
    listed = front.lms("link", "ls")
    assert [line.split()[2] for line in listed.stdout.splitlines()[1:3]] == \
        ["reachable", "reachable"]


@pytest.mark.parametrize("link", LINKS)
def test_chat_whole_and_streamed_agree(front: ProcessServer, link: str) -> None:
    whole = ask(front, f"{link}/{MODEL}")
    choice = whole.choices[0]
    assert choice.message.content and choice.finish_reason in ("length", "stop")
    assert 0 < whole.usage.completion_tokens <= 8 and whole.usage.prompt_tokens > 0
    parts = [c.choices[0].delta.content or "" for c in ask(front, f"{link}/{MODEL}", stream=True)
             if c.choices]
    assert len([p for p in parts if p]) >= 2  # chunk by chunk, as the engine sent them
    assert "".join(parts) == choice.message.content


@pytest.mark.parametrize("link", LINKS)
def test_a_forced_tool_call_passes_through(front: ProcessServer, link: str) -> None:
    model = f"{link}/{MODEL}"
    r = ask(front, model, "What is the weather in Paris?", tools=[WEATHER],
            tool_choice=FORCE_WEATHER, max_tokens=60)
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments).get("city"), str)
    if link == "lmscli":
        return  # its streamed calls are checked on the fake engine; its grammar is slow here
    args = "".join(tc.function.arguments or ""
                   for c in ask(front, model, "What is the weather in Paris?", tools=[WEATHER],
                                tool_choice=FORCE_WEATHER, max_tokens=60, stream=True)
                   if c.choices for tc in c.choices[0].delta.tool_calls or [])
    assert json.loads(args) == json.loads(call.function.arguments)


def test_embeddings_through_a_link(front: ProcessServer, real_server: ProcessServer) -> None:
    far = sdk(front).embeddings.create(model=f"lmscli/{MODEL}", input=["cats purr"])
    near = sdk(real_server).embeddings.create(model=MODEL, input=["cats purr"])
    assert far.data[0].embedding == near.data[0].embedding


@pytest.mark.parametrize("link", LINKS)
def test_a_client_that_leaves_ends_the_upstream_request(front: ProcessServer,
                                                        real_server: ProcessServer,
                                                        link: str) -> None:
    body = {"model": f"{link}/{MODEL}", "stream": True, "max_tokens": 1500, "temperature": 0,
            "messages": [{"role": "user", "content": "Write a very long story."}]}
    with httpx.stream("POST", front.base_url + "/v1/chat/completions", json=body,
                      timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or not line for line in got)
        assert links(front)[link]["inFlight"] == 1
    for _ in range(40):
        if links(front)[link]["inFlight"] == 0:
            break
        time.sleep(0.05)
    assert links(front)[link]["inFlight"] == 0
    if link == "lmscli":  # the engine itself says it stopped (it notices within a step)
        def statuses() -> list[str]:
            loaded = httpx.get(real_server.base_url + "/lmscli/models/loaded").json()
            return [m["status"] for m in loaded]

        for _ in range(60):
            if statuses() == ["idle"]:
                break
            time.sleep(0.05)
        assert statuses() == ["idle"]


def test_sdk_respond_act_and_lms_chat(front: ProcessServer) -> None:
    client = lms.Client(f"127.0.0.1:{front.port}")
    model = client.llm.model(f"llamacpp/{MODEL}")
    result = model.respond("Say hello.", config={"maxTokens": 8, "temperature": 0})
    assert result.content and 0 < result.stats.predicted_tokens_count <= 8
    assert result.stats.time_to_first_token_sec is not None
    asked = []

    def get_weather(city: str) -> str:
        """The weather in a city"""
        asked.append(city)
        return "sunny"

    act = client.llm.model(f"lmscli/{MODEL}").act(
        "What is the weather in Paris?", [get_weather], tool_choice="required",
        max_prediction_rounds=2, config={"maxTokens": 40, "temperature": 0})
    assert act.rounds == 2 and len(asked) == 1
    chat = front.lms("chat", f"lmscli/{MODEL}", "-p", "Say hello.", input="")
    assert chat.returncode == 0 and chat.stdout.strip(), chat.stderr


def test_a_replica_killed_mid_run_leaves_no_request_failed(front: ProcessServer,
                                                           llamacpp: LlamaCppServer) -> None:
    """Last in this module: it kills the llama_cpp.server replica."""
    before = {name: item["served"] for name, item in links(front).items()}
    results: list[str] = []
    errors: list[Exception] = []
    half = threading.Event()

    def worker() -> None:
        for _ in range(6):
            try:
                results.append(ask(front, MODEL, max_tokens=16).choices[0].message.content)
            except Exception as exc:  # counted: the assertion below shows which
                errors.append(exc)
            if len(results) >= 4:
                half.set()

    workers = [threading.Thread(target=worker) for _ in range(2)]
    for w in workers:
        w.start()
    assert half.wait(120)
    llamacpp.kill()  # requests to it in flight now fail before any byte reached the client
    for w in workers:
        w.join(180)
    assert errors == [] and len(results) == 12 and all(results)
    after = links(front)
    assert after["llamacpp"]["served"] > before["llamacpp"]  # it did take a share
    assert after["lmscli"]["served"] - before["lmscli"] >= 6
    assert "unreachable" in front.lms("link", "ls").stdout
