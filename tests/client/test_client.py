"""The SDK surface (``import lmscli as lms``) against a real server thread, fake engine."""

from __future__ import annotations

import builtins
import logging
import subprocess
import sys
from collections.abc import Iterator

import pytest

import lmscli as lms
from lmscli.client import default
from lmscli.engine.fake import DEFAULT_REPLY
from tests.conftest import ThreadServer
from tests.doc_tools import docs_chat_loop


@pytest.fixture(autouse=True)
def fresh_default_client() -> Iterator[None]:
    default.reset_default_client()
    yield
    default.reset_default_client()


@pytest.fixture
def model(fake_server: ThreadServer) -> lms.LLM:
    return lms.llm("tiny-chat")


# -- the docs' examples, as written ---------------------------------------------------------

def test_quick_respond(model: lms.LLM, capsys) -> None:
    model = lms.llm()
    print(model.respond("What is the meaning of life?"))
    assert capsys.readouterr().out == DEFAULT_REPLY + "\n"


def test_streaming_respond(model: lms.LLM, capsys) -> None:
    model = lms.llm()
    for fragment in model.respond_stream("What is the meaning of life?"):
        print(fragment.content, end="", flush=True)
    print()
    assert capsys.readouterr().out == DEFAULT_REPLY + "\n"


def test_chat_with_system_prompt_config_and_stats(model: lms.LLM, capsys) -> None:
    chat = lms.Chat("You are a resident AI philosopher.")
    chat.add_user_message("What is the meaning of life?")
    result = model.respond(chat)
    print(result)
    prediction_stream = model.respond_stream(chat, config={"temperature": 0.6, "maxTokens": 3})
    for _fragment in prediction_stream:
        pass
    result = prediction_stream.result()
    print("Model used:", result.model_info.display_name)
    print("Predicted tokens:", result.stats.predicted_tokens_count)
    print("Time to first token (seconds):", result.stats.time_to_first_token_sec)
    print("Stop reason:", result.stats.stop_reason)
    out = capsys.readouterr().out
    assert out.startswith(DEFAULT_REPLY + "\n")
    assert "Model used: Tiny Chat" in out and "Predicted tokens: 3" in out
    assert "Stop reason: maxPredictedTokensReached" in out
    assert result.stats.total_tokens_count == (result.stats.prompt_tokens_count
                                               + result.stats.predicted_tokens_count)
    assert result.model_info.model_key == "tiny-chat"
    assert result.model_info.path == "test/tiny-chat-GGUF/tiny-chat.Q4_0.gguf"


def test_progress_callback(model: lms.LLM, capsys) -> None:
    llm = lms.llm()
    llm.respond("What is LM Studio?",
                on_prompt_processing_progress=(lambda p: print(f"{p * 100}% complete")))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "0.0% complete" and lines[-1] == "100.0% complete"


def test_multi_turn_loop_with_on_message(model: lms.LLM, monkeypatch, capsys) -> None:
    answers = iter(["Hello", "How are you?", ""])
    monkeypatch.setattr(builtins, "input", lambda prompt="": next(answers))
    chat = docs_chat_loop(lms)
    roles = [m["role"] for m in chat.messages]
    assert roles == ["system", "user", "assistant", "user", "assistant"]
    assert capsys.readouterr().out.count("Bot: " + DEFAULT_REPLY) == 2


# -- callbacks ------------------------------------------------------------------------------

def test_callback_order_and_arguments(model: lms.LLM) -> None:
    calls: list[tuple] = []
    result = model.respond(
        "hi",
        on_prompt_processing_progress=lambda p: calls.append(("progress", p)),
        on_first_token=lambda: calls.append(("first",)),
        on_prediction_fragment=lambda f: calls.append(("fragment", f.content)),
        on_message=lambda m: calls.append(("message", m.role, m.text)),
    )
    progress = [c[1] for c in calls if c[0] == "progress"]
    assert progress[0] == 0.0 and progress[-1] == 1.0
    assert all(a < b for a, b in zip(progress, progress[1:], strict=False))
    kinds = [c[0] for c in calls]
    first = kinds.index("first")
    assert kinds[:first] == ["progress"] * first
    assert kinds.count("first") == 1 and kinds[first + 1] == "fragment"
    assert kinds[-1] == "message" and kinds.count("message") == 1
    assert calls[-1] == ("message", "assistant", result.content)


def test_callback_exceptions_are_logged_not_raised(model: lms.LLM, caplog) -> None:
    def boom(*_args: object) -> None:
        raise RuntimeError("callback bug")

    with caplog.at_level(logging.ERROR, logger="lmscli.client"):
        result = model.respond("hi", on_first_token=boom, on_prediction_fragment=boom)
    assert result.content == DEFAULT_REPLY
    assert "callback bug" in caplog.text


# -- cancellation ---------------------------------------------------------------------------

def test_cancel_still_gives_a_result(model: lms.LLM) -> None:
    words = " ".join(f"w{i}" for i in range(100))
    with model.respond_stream(f"[[slow]] [[reply: {words}]]") as stream:
        for seen, _ in enumerate(stream, start=1):
            if seen == 2:
                stream.cancel()
        result = stream.result()
    assert result.stats.stop_reason == "userStopped"
    assert result.stats.predicted_tokens_count < 20


def test_breaking_out_without_cancel(model: lms.LLM) -> None:
    stream = model.respond_stream("[[slow]] [[reply: a b c d e f g h]]")
    for _ in stream:
        break
    stream.close()
    with pytest.raises(lms.CancelledError, match="please use .cancel"):
        stream.result()
    assert model.respond("hi").content == DEFAULT_REPLY  # the model is free again


def test_result_before_the_end_is_an_error(model: lms.LLM) -> None:
    with model.respond_stream("hi") as stream, pytest.raises(lms.LMSError, match="not finished"):
        stream.result()


# -- other calls ----------------------------------------------------------------------------

def test_complete_sends_the_raw_prompt(model: lms.LLM) -> None:
    assert model.complete("[[reply: raw text]]").content == "raw text"


def test_structured_result_is_parsed(model: lms.LLM) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    result = model.respond('[[reply: {"a": 1}]]', response_format=schema)
    assert result.parsed == {"a": 1} and result.structured
    assert str(result) == '{\n  "a": 1\n}'


def test_handles_and_listings(model: lms.LLM) -> None:
    assert model.identifier == "tiny-chat"
    assert model.get_context_length() == 256
    assert model.get_info().display_name == "Tiny Chat"
    assert [m.identifier for m in lms.list_loaded_models()] == ["tiny-chat"]
    keys = {m.model_key for m in lms.list_downloaded_models()}
    assert keys == {"tiny-chat", "tiny-chat-large", "other-model"}
    again = lms.llm("tiny-chat")  # get-or-load: no second instance
    assert again.identifier == "tiny-chat"
    assert len(lms.list_loaded_models()) == 1
    model.unload()
    assert lms.list_loaded_models() == []


def test_explicit_client(fake_server: ThreadServer) -> None:
    with lms.Client(f"127.0.0.1:{fake_server.port}") as client:
        handle = client.llm.model("tiny-chat", ttl=60)
        assert handle.respond("hi").content == DEFAULT_REPLY
        assert [h.identifier for h in client.llm.list_loaded()] == ["tiny-chat"]


# -- errors ---------------------------------------------------------------------------------

def test_no_server_says_how_to_start_it(home) -> None:
    with pytest.raises(lms.ServerNotRunningError) as info:
        lms.llm()
    assert "lms server start" in (info.value.hint or "")


def test_no_model_loaded(fake_server: ThreadServer) -> None:
    with pytest.raises(lms.ModelNotFoundError, match="no models are currently loaded"):
        lms.llm()


def test_unknown_model_lists_available(fake_server: ThreadServer) -> None:
    with pytest.raises(lms.ModelNotFoundError, match="tiny-chat"):
        lms.llm("no-such-model")


def test_bad_config_value(model: lms.LLM) -> None:
    with pytest.raises(lms.LMSError, match="temperature"):
        model.respond("hi", config={"temperature": -1})


# -- Chat -----------------------------------------------------------------------------------

def test_chat_rules() -> None:
    chat = lms.Chat.from_history({"messages": [{"role": "user", "content": "a"},
                                               ("assistant", "b")]})
    chat.add_user_message("c")
    chat.add_user_message("d")  # consecutive user messages merge
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user"]
    assert [p["text"] for p in chat.messages[-1]["content"]] == ["c", "d"]
    copy = chat.copy()
    copy.add_user_message("more")  # merges into the copy's last user message only
    assert len(copy) == len(chat)
    assert copy.messages[-1] != chat.messages[-1]
    chat.add_assistant_response("x")
    with pytest.raises(lms.LMSError, match="consecutive"):
        chat.add_assistant_response("y")
    assert str(lms.Chat.from_history("hi")).startswith("Chat.from_history(")
    with pytest.raises(lms.LMSError):
        chat.add_user_message("")


def test_client_module_imports_httpx_and_stdlib_only() -> None:
    # (rich is left out: httpx's own command-line module imports it when it is installed)
    code = ("import sys, lmscli as lms; lms.Chat; "
            "print([m for m in ('typer', 'starlette', 'uvicorn', 'llama_cpp', 'jinja2', "
            "'prompt_toolkit', 'huggingface_hub', 'platformdirs') if m in sys.modules])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"LMSCLI_HOME": "/tmp", "PATH": ""})
    assert r.stdout.strip() == "[]", r.stderr
