"""Shared fixtures: an isolated home per test, synthetic and real models, real servers."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest

from tests.gguf_factory import make_gguf

if TYPE_CHECKING:
    from lmscli.engine.base import ModelInstance

DEFAULT_MODEL_REL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
QWEN_MODEL = "qwen2.5-coder-0.5b-instruct"
QWEN_MODEL_REL = ("Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/"
                  "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
# Real tests share one download per machine; CI fetches it on its first run.
MODEL_CACHE = Path(os.environ.get("LMSCLI_TEST_MODELS",
                                  Path.home() / ".cache" / "lmscli-test" / "models"))


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("LMSCLI_HOME", str(h))
    for var in ("LMSCLI_MODELS_DIR", "LMS_SERVER_HOST", "LMSCLI_ENGINE", "NO_COLOR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("COLUMNS", "200")
    return h


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=0.5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer")


# -- synthetic models + fake engine ---------------------------------------------------------

FAKE_KEYS = ["tiny-chat", "tiny-chat-large", "other-model"]


@pytest.fixture
def fake_models(home: Path) -> Path:
    models = home / "models"
    make_gguf(models / "test/tiny-chat-GGUF/tiny-chat.Q4_0.gguf", name="Tiny Chat",
              context_length=256)
    make_gguf(models / "test/tiny-chat-large-GGUF/tiny-chat-large.Q8_0.gguf",
              name="Tiny Chat Large", context_length=512)
    make_gguf(models / "acme/other-model-GGUF/other-model-F16.gguf", name="Other",
              context_length=256)
    return models


class ThreadServer:
    """The real ASGI app under a real uvicorn, in a thread, advertised in the state file."""

    def __init__(self, engine: object, **settings: object) -> None:
        import uvicorn

        from lmscli import serverstate
        from lmscli.server.app import Settings, create_app

        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(None, host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.app = create_app(engine, Settings(port=self.port, **settings),  # type: ignore
                              self.server)
        config.app = self.app
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_for(self.base_url + "/lmstudio-greeting")
        serverstate.write_state(serverstate.ServerState(os.getpid(), "127.0.0.1", self.port,
                                                        time.time()))

    @property
    def models(self):  # noqa: ANN201 - the server's ModelManager
        return self.app.state.server.models

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture
def fake_server(fake_models: Path) -> Iterator[ThreadServer]:
    from lmscli.engine.fake import FakeEngine

    server = ThreadServer(FakeEngine(), reap_every_s=0.1)
    yield server
    server.stop()


# -- the real default model -----------------------------------------------------------------

def cached_builtin(name: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A built-in model from the shared test cache, fetched there the first time."""
    from lmscli import catalog

    saved = os.environ.get("LMSCLI_HOME")
    os.environ["LMSCLI_HOME"] = str(tmp_path_factory.mktemp("fetch-home"))
    try:
        result = catalog.get_model(name, models_dir=MODEL_CACHE)
    finally:
        if saved is None:
            os.environ.pop("LMSCLI_HOME", None)
        else:
            os.environ["LMSCLI_HOME"] = saved
    return result.model.abs_path


def load_default_model(model_file: Path, parallel: int) -> ModelInstance:
    """The real engine with the default model, for tests that drive the engine directly."""
    from lmscli.engine import LoadOptions, ModelSpec, get_engine

    spec = ModelSpec(path=str(model_file), model_key="smollm2-135m-instruct",
                     max_context_length=8192)
    return get_engine("llama.cpp").load(spec, LoadOptions(context_length=4096,
                                                          parallel=parallel))


def user_prompt(inst: ModelInstance, text: str) -> str:
    """One user message through the model's own chat template."""
    from lmscli.prompting import render_chat

    return render_chat(None, [{"role": "user", "content": text}], bos_token=inst.bos_token,
                       eos_token=inst.eos_token)


@pytest.fixture(scope="session")
def default_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmscli import catalog

    return cached_builtin(catalog.DEFAULT_MODEL, tmp_path_factory)


@pytest.fixture(scope="session")
def qwen_model_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Qwen2.5-Coder 0.5B Instruct: a small model trained for tool calls (491 MB)."""
    return cached_builtin(QWEN_MODEL, tmp_path_factory)


def link_model(home: Path, model_file: Path, rel_path: str) -> None:
    target = home / "models" / rel_path
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.symlink_to(model_file)


def link_default_model(home: Path, model_file: Path) -> None:
    link_model(home, model_file, DEFAULT_MODEL_REL)


class ProcessServer:
    """``python -m lmscli.server`` as its own process, with its own home."""

    def __init__(self, home: Path, port: int | None = None, *options: str) -> None:
        self.home = home
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = os.environ | {"LMSCLI_HOME": str(home)}
        self.log = open(home / "server-test.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lmscli.server", "--port", str(self.port), *options],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(self.base_url + "/lmstudio-greeting", timeout=60)

    def lms(self, *args: str, input: str | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lmscli", *args], env=self.env,
                              input=input, capture_output=True, text=True, timeout=timeout)

    def load_default(self, context_length: int, *options: str) -> None:
        """The default model with a bounded context. `lms chat -p`, `lms act` and the docs'
        examples set no token limit, and a small model can talk until its context is full:
        at the default model's 8192 tokens, four minutes on a 2-core machine."""
        r = self.lms("load", "smollm2-135m-instruct", "-c", str(context_length), "-y", *options)
        assert r.returncode == 0, r.stderr

    @contextlib.contextmanager
    def short_model(self, identifier: str, context_length: int = 256) -> Iterator[str]:
        """The default model loaded as `identifier` with a small context, unloaded after."""
        self.load_default(context_length, "--identifier", identifier)
        try:
            yield identifier
        finally:
            self.lms("unload", identifier)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory,
                default_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("real-home")
    link_default_model(home, default_model_file)
    server = ProcessServer(home)
    yield server
    server.stop()


def read_call_stream(stream: Iterable[Any]) -> tuple[str, str, str, str | None]:
    """A streamed chat completion (OpenAI SDK chunks) as its text, the name and arguments of
    its tool call(s) joined, and the finish reason."""
    text, name, arguments, finish = "", "", "", None
    for chunk in stream:
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for tc in delta.tool_calls or []:
            name += tc.function.name or ""
            arguments += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, name, arguments, finish


@pytest.fixture
def no_sdk_complaints(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """The lmstudio SDK logs what it didn't expect (unknown messages, messages for closed
    channels, protocol warnings) instead of failing: none of that may happen."""
    import logging

    caplog.set_level(logging.WARNING)
    yield
    complaints = [r.getMessage() for r in caplog.records
                  if "lmstudio" in r.pathname and r.levelno >= logging.WARNING]
    assert complaints == []


def prediction_logs(base_url: str, count: int, action: Callable[[], object]) -> list[dict]:
    """The first ``count`` prediction events (``llm.prediction.*``) on the server's log
    stream while ``action`` runs."""
    import threading

    from lmscli.client.logs import stream_logs

    events: list[dict] = []
    subscribed = threading.Event()

    def follow() -> None:
        for message in stream_logs(base_url):
            if message["type"] == "subscribed":
                subscribed.set()
            elif message["type"] == "log" and \
                    message["log"]["data"]["type"].startswith("llm.prediction."):
                events.append(message["log"]["data"])
                if len(events) == count:
                    return

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    assert subscribed.wait(5)
    action()
    reader.join(5)
    return events
