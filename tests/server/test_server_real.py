"""A real server process with the default model, driven by the OpenAI SDK and the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from lmscli import serverstate
from tests.conftest import DEFAULT_MODEL_REL, ProcessServer, free_port, link_default_model

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"
MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France? Answer briefly."}]


def sdk(server: ProcessServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="lm-studio", max_retries=0)


def test_openai_sdk_streamed_and_whole_agree(real_server: ProcessServer) -> None:
    client = sdk(real_server)
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                           max_tokens=40)
    text = whole.choices[0].message.content
    assert text and text.strip()
    assert whole.choices[0].finish_reason in ("stop", "length")
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=MESSAGES, temperature=0, max_tokens=40, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    usage = chunks[-1].usage
    assert usage.prompt_tokens == whole.usage.prompt_tokens
    assert usage.completion_tokens == whole.usage.completion_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # the second, identical prompt reuses everything but the last prompt token
    assert usage.prompt_tokens_details.cached_tokens >= usage.prompt_tokens - 1


def test_second_turn_reports_cached_tokens(real_server: ProcessServer) -> None:
    client = sdk(real_server)
    first = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                           max_tokens=30)
    follow = MESSAGES + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "And of Italy?"}]
    second = client.chat.completions.create(model=MODEL, messages=follow, temperature=0,
                                            max_tokens=30)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached >= first.usage.prompt_tokens - 1
    assert second.usage.prompt_tokens > cached


def test_rest_v0_stats_and_text_completion(real_server: ProcessServer) -> None:
    body = httpx.post(real_server.base_url + "/api/v0/chat/completions", timeout=60, json={
        "model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 0}).json()
    assert body["stats"]["tokens_per_second"] > 0
    assert body["stats"]["time_to_first_token"] > 0
    assert body["model_info"] == {"arch": "llama", "quant": "Q4_1", "format": "gguf",
                                  "context_length": 8192}
    assert body["runtime"]["name"] == "llama.cpp"
    r = sdk(real_server).completions.create(model=MODEL, prompt="The sky is", max_tokens=5,
                                            temperature=0)
    assert r.choices[0].text and r.usage.completion_tokens <= 5


def test_embeddings_from_the_chat_model(real_server: ProcessServer) -> None:
    r = sdk(real_server).embeddings.create(model=MODEL, input=["cats purr", "dogs bark"])
    a, b = (d.embedding for d in r.data)
    assert len(a) == 576 and a != b


def test_frequency_and_presence_penalties_change_greedy_output(
        real_server: ProcessServer) -> None:
    """They were accepted and ignored once: a client asking for less repetition got none."""
    ask = [{"role": "user", "content": "List ten fruits, one per line."}]

    def reply(**penalties: float) -> str:
        chat = sdk(real_server).chat.completions.create(
            model=MODEL, messages=ask, max_tokens=40, temperature=0, **penalties)
        return chat.choices[0].message.content or ""

    plain = reply()
    assert reply(frequency_penalty=2.0) != plain
    assert reply(presence_penalty=2.0) != plain
    assert reply() == plain  # greedy: the difference is the penalty's, not chance


def test_cli_load_ps_unload(real_server: ProcessServer) -> None:
    real_server.lms("unload", "--all")
    r = real_server.lms("load", "smol", "--identifier", "my-smol", "-c", "2048")
    assert r.returncode == 0, r.stderr
    assert "Model loaded successfully" in r.stderr and '"my-smol"' in r.stderr
    r = real_server.lms("ps", "--json")
    entries = {e["identifier"]: e for e in json.loads(r.stdout)}
    assert entries["my-smol"]["contextLength"] == 2048
    r = real_server.lms("ls")
    assert "✓ LOADED" in r.stdout
    chat = sdk(real_server).chat.completions.create(model="my-smol", messages=MESSAGES,
                                                    max_tokens=5)
    assert chat.model == "my-smol"
    r = real_server.lms("unload", "my-smol")
    assert r.returncode == 0 and 'Model "my-smol" unloaded.' in r.stderr
    assert "my-smol" not in real_server.lms("ps").stdout


def test_cli_chat_with_a_server_of_another_home(real_server: ProcessServer,
                                                tmp_path: Path) -> None:
    """--host/--port: a home with no models and no server chats with the remote model."""
    here = tmp_path / "client-home"
    here.mkdir()
    where = ["--host", "127.0.0.1", "--port", str(real_server.port)]
    env = os.environ | {"LMSCLI_HOME": str(here)}
    with real_server.short_model("short-chat") as short:
        r = subprocess.run([sys.executable, "-m", "lmscli", "chat", short, "-p",
                            "What is the capital of France?", "--stats", *where],
                           env=env, capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "Tokens/Second" in r.stderr
    # nothing was started or fetched here
    assert not (here / "models").exists() and not list(here.rglob("server.json"))


def test_corrupt_gguf_load_fails_cleanly(real_server: ProcessServer,
                                         default_model_file: Path) -> None:
    broken = real_server.home / "models/test/broken-GGUF/broken.Q4_1.gguf"
    broken.parent.mkdir(parents=True, exist_ok=True)
    with open(default_model_file, "rb") as f:
        broken.write_bytes(f.read(6_000_000))  # whole header, missing weights
    try:
        r = real_server.lms("load", "broken", "-y")
        assert r.returncode == 1
        assert "Failed to load broken" in r.stderr and "Traceback" not in r.stderr
        r = httpx.post(real_server.base_url + "/v1/chat/completions", timeout=60, json={
            "model": "broken", "messages": MESSAGES})
        assert r.status_code == 422 and r.json()["error"]["code"] == "model_load_failed"
        assert httpx.get(real_server.base_url + "/lmstudio-greeting").json() == {
            "lmstudio": True}
    finally:
        broken.unlink()


def lms(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lmscli", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ | {"LMSCLI_HOME": str(home)})


def test_server_lifecycle_background_process(home: Path, default_model_file: Path) -> None:
    link_default_model(home, default_model_file)
    port = free_port()
    r = lms(home, "server", "start", "-p", str(port))
    assert r.returncode == 0, r.stderr
    assert f"Success! Server is now running on port {port}" in r.stderr
    try:
        r = lms(home, "server", "start")  # remembers the port, says it runs
        assert r.returncode == 0 and f"already running on port {port}" in r.stderr
        r = lms(home, "server", "start", "-p", str(free_port()))
        assert r.returncode == 1 and "already running" in r.stderr
        r = lms(home, "load", "smollm2-135m-instruct")
        assert r.returncode == 0, r.stderr
        r = lms(home, "server", "stop")
        assert r.returncode == 0 and f"Stopped the server on port {port}." in r.stderr
        assert json.loads(lms(home, "server", "status", "--json").stdout) == {
            "running": False, "port": port}
    finally:
        lms(home, "server", "stop")


def test_killed_server_leaves_nothing_that_confuses_the_next_start(home: Path) -> None:
    port = free_port()
    assert lms(home, "server", "start", "-p", str(port)).returncode == 0
    state = serverstate.read_state()
    assert state is not None
    os.kill(state.pid, signal.SIGKILL)
    time.sleep(0.3)
    r = lms(home, "server", "status")
    assert "The server is not running." in r.stderr
    r = lms(home, "server", "start")
    assert r.returncode == 0, r.stderr
    lms(home, "server", "stop")


def test_port_in_use(home: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = lms(home, "server", "start", "-p", str(port))
    assert r.returncode == 1
    assert f"Port {port} is already in use" in r.stderr and "Traceback" not in r.stderr
    assert serverstate.read_state() is None


def test_client_commands_start_the_server(home: Path, default_model_file: Path) -> None:
    link_default_model(home, default_model_file)
    (home / ".internal").mkdir(exist_ok=True)
    (home / ".internal/http-server-config.json").write_text(json.dumps({"port": free_port()}))
    r = lms(home, "load", "smollm2", "-y")
    try:
        assert r.returncode == 0, r.stderr
        assert "Starting the lmscli server" in r.stderr
        assert DEFAULT_MODEL_REL.split("/")[0]  # the model came from the models folder
    finally:
        lms(home, "server", "stop")
