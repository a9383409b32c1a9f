"""The SDK surface and lms chat on the real default model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import lmscli as lms
from lmscli.client import default
from tests.conftest import ProcessServer, free_port

pytestmark = pytest.mark.real


@pytest.fixture(autouse=True)
def use_real_server(real_server: ProcessServer, monkeypatch: pytest.MonkeyPatch
                    ) -> Iterator[None]:
    monkeypatch.setenv("LMSCLI_HOME", str(real_server.home))
    default.reset_default_client()
    yield
    default.reset_default_client()


def test_docs_examples_on_the_real_model(capsys) -> None:
    model = lms.llm("smollm2-135m-instruct")
    print(model.respond("What is the meaning of life?", config={"maxTokens": 20}))
    for fragment in model.respond_stream("What is the meaning of life?",
                                         config={"maxTokens": 20}):
        print(fragment.content, end="", flush=True)
    print()
    chat = lms.Chat("You are a resident AI philosopher.")
    chat.add_user_message("What is the meaning of life?")
    prediction_stream = model.respond_stream(chat, config={"temperature": 0.6,
                                                           "maxTokens": 50})
    for _ in prediction_stream:
        pass
    result = prediction_stream.result()
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) >= 2
    assert result.model_info.display_name
    assert 0 < result.stats.predicted_tokens_count <= 50
    assert result.stats.time_to_first_token_sec > 0
    assert result.stats.stop_reason in ("eosFound", "maxPredictedTokensReached")


def test_progress_rises_to_one_before_the_first_token() -> None:
    model = lms.llm()
    events: list[tuple[str, float]] = []
    model.respond("Summarise this: " + "The cat sat on the mat. " * 150,
                  config={"maxTokens": 5},
                  on_prompt_processing_progress=lambda p: events.append(("p", p)),
                  on_first_token=lambda: events.append(("first", 0)))
    progress = [v for k, v in events if k == "p"]
    assert progress[0] == 0.0 and progress[-1] == 1.0 and len(progress) >= 4
    assert all(a < b for a, b in zip(progress, progress[1:], strict=False))
    assert events.index(("first", 0)) == len(progress)


def test_structured_output_follows_the_schema() -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string"},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    result = lms.llm().respond("Invent a person. Reply in JSON.", response_format=schema,
                               config={"maxTokens": 60, "temperature": 0})
    assert isinstance(result.parsed, dict), result.content
    assert set(result.parsed) == {"name", "age"} and isinstance(result.parsed["age"], int)


def test_multi_turn_chat_reuses_the_kv_cache() -> None:
    model = lms.llm()
    chat = lms.Chat("You are a task focused AI assistant")
    previous_prompt = 0
    for question in ("Name a fruit.", "Name a colour.", "Name an animal.", "Name a city."):
        chat.add_user_message(question)
        result = model.respond(chat, on_message=chat.append, config={"maxTokens": 12,
                                                                      "temperature": 0})
        stats = result.stats
        if previous_prompt:
            # everything up to the new user turn came from the cache
            assert stats.cached_prompt_tokens_count >= previous_prompt
        previous_prompt = stats.prompt_tokens_count
    assert len(chat) == 9


def test_cancel_on_the_real_engine() -> None:
    with lms.llm().respond_stream("Write a long story about a lighthouse.",
                                  config={"maxTokens": 400}) as stream:
        for n, _ in enumerate(stream):
            if n == 3:
                stream.cancel()
        result = stream.result()
    assert result.stats.stop_reason == "userStopped"
    assert result.stats.predicted_tokens_count < 50  # of 400; the rest is the CPU's speed


@pytest.mark.timeout(700)
def test_chat_fetches_and_loads_the_default_model(tmp_path: Path,
                                                  default_model_file: Path) -> None:
    home = tmp_path / "fresh"
    (home / ".internal").mkdir(parents=True)
    (home / ".internal/http-server-config.json").write_text(json.dumps({"port": free_port()}))
    env = os.environ | {"LMSCLI_HOME": str(home)}
    try:
        r = subprocess.run([sys.executable, "-m", "lmscli", "chat", "-p",
                            "Say hello in five words."], env=env, capture_output=True,
                           text=True, timeout=600)  # a ramble to the full context: ~250 s
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() and r.stdout.endswith("\n")
        assert "fetching smollm2-135m-instruct" in r.stderr
        assert "Starting the lmscli server" in r.stderr
        assert (home / "models/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF").is_dir()
    finally:
        subprocess.run([sys.executable, "-m", "lmscli", "server", "stop"], env=env,
                       capture_output=True, timeout=60)


def test_chat_with_a_named_model_and_stats(real_server: ProcessServer) -> None:
    with real_server.short_model("short-chat") as short:
        r = real_server.lms("chat", short, "-p", "What is 2+2?", "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip()
    assert "Prediction Stats:" in r.stderr and "Tokens/Second:" in r.stderr
