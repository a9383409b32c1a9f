"""Ollama's API (``/api/*``) on the fake engine, with the official ``ollama`` client: the
listings, chat and generate (whole and streamed, tools, formats, keep_alive), embeddings,
pull and delete, names as Ollama clients send them, and Ollama's error shape."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import ollama
import pytest

from lmscli import catalog
from lmscli.engine.fake import DEFAULT_REPLY
from lmscli.server.apis.ollama_api import parse_duration
from lmscli.server.apis.ollama_names import pull_target
from tests.conftest import ProcessServer, ThreadServer
from tests.server.test_api_v1 import hub  # noqa: F401  (a fixture)

CALL = '[TOOL_REQUEST]{"name": "get_weather", "arguments": {"city": "Paris"}}[END_TOOL_REQUEST]'
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}


def client(server: ThreadServer | ProcessServer, timeout: float = 30) -> ollama.Client:
    return ollama.Client(host=server.base_url, timeout=timeout)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# -- listings -------------------------------------------------------------------------------

def test_version_tags_show_and_ps(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    assert httpx.get(fake_server.base_url + "/api/version").json()["version"].count(".") == 2
    models = {m.model: m for m in c.list().models}
    assert set(models) == {"tiny-chat:latest", "tiny-chat-large:latest", "other-model:latest"}
    tiny = models["tiny-chat:latest"]
    assert tiny.size and tiny.size > 0 and len(tiny.digest or "") == 64 and tiny.modified_at
    assert tiny.details and tiny.details.format == "gguf"
    quant = catalog.find_model("tiny-chat").quantization
    assert tiny.details.quantization_level == quant and tiny.details.family

    shown = c.show("tiny-chat:latest")
    assert shown.details and shown.details.quantization_level == quant
    assert "completion" in (shown.capabilities or [])
    assert shown.modelinfo and shown.modelinfo["general.architecture"] == tiny.details.family
    assert shown.template is not None and "FROM " in (shown.modelfile or "")

    assert c.ps().models == []
    c.chat("tiny-chat", messages=user("Hi"))
    running = c.ps().models
    assert [m.model for m in running] == ["tiny-chat:latest"]
    assert running[0].context_length == 256 and running[0].expires_at


def test_unknown_model_is_ollamas_404(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    for call in (lambda: c.chat("no-such-model", messages=user("Hi")),
                 lambda: c.show("no-such-model"),
                 lambda: c.generate("no-such-model", "Hi"),
                 lambda: c.embed("no-such-model", "Hi"),
                 lambda: c.delete("no-such-model")):
        with pytest.raises(ollama.ResponseError) as err:
            call()
        assert err.value.status_code == 404 and "no-such-model" in err.value.error
    r = httpx.post(fake_server.base_url + "/api/chat", content=b"{",
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and set(r.json()) == {"error"}
    r = httpx.post(fake_server.base_url + "/api/copy", json={})
    assert r.status_code == 404 and set(r.json()) == {"error"}


def test_names_resolve_as_ollama_clients_send_them(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    assert c.chat("tiny-chat:latest", messages=user("Hi")).message.content == DEFAULT_REPLY
    # name:tag finds the key as lms load -y would: the best fuzzy match
    assert c.chat("other:model", messages=user("Hi")).model == "other:model"
    assert [m.model for m in c.ps().models] == ["other-model:latest"]  # JIT replaced JIT


# -- chat and generate ----------------------------------------------------------------------

def test_chat_whole_and_streamed(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    whole = c.chat("tiny-chat", messages=user("Hi"), options={"temperature": 0, "seed": 1})
    assert whole.message.role == "assistant" and whole.message.content == DEFAULT_REPLY
    assert whole.done and whole.done_reason == "stop"
    assert whole.eval_count == 6 and (whole.prompt_eval_count or 0) > 0
    assert (whole.total_duration or 0) >= (whole.eval_duration or 0) > 0
    assert whole.load_duration is not None and whole.load_duration > 0  # it loaded
    parts = list(c.chat("tiny-chat", messages=user("Hi"), stream=True))
    assert "".join(p.message.content or "" for p in parts) == DEFAULT_REPLY
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True]
    assert parts[-1].eval_count == 6 and parts[-1].load_duration == 0


def test_chat_options_limit_and_stop(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    short = c.chat("tiny-chat", messages=user("[[count: 9]]"), options={"num_predict": 3})
    assert short.message.content.strip() == "n1 n2 n3" and short.done_reason == "length"
    stopped = c.chat("tiny-chat", messages=user("[[count: 9]]"), options={"stop": [" n4"]})
    assert stopped.message.content.strip() == "n1 n2 n3" and stopped.done_reason == "stop"
    with pytest.raises(ollama.ResponseError) as err:
        c.chat("tiny-chat", messages=user("Hi"), options={"temperature": "hot"})
    assert err.value.status_code == 400 and "options.temperature" in err.value.error


def test_chat_tools_calls_and_results(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    r = c.chat("tiny-chat", messages=user(f"[[reply: {CALL}]]"), tools=[WEATHER])
    calls = r.message.tool_calls or []
    assert [(t.function.name, dict(t.function.arguments)) for t in calls] == \
        [("get_weather", {"city": "Paris"})]
    streamed = [p for p in c.chat("tiny-chat", messages=user(f"[[reply: {CALL}]]"),
                                  tools=[WEATHER], stream=True) if p.message.tool_calls]
    assert len(streamed) == 1  # Ollama sends a call whole
    # the call and its result go back without ids, as Ollama clients send them
    history = [*user("Weather in Paris?"),
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
               {"role": "tool", "content": "18 degrees", "tool_name": "get_weather"}]
    answer = c.chat("tiny-chat", messages=history, tools=[WEATHER])
    assert answer.message.content == DEFAULT_REPLY


def test_chat_thinking_and_format(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    r = c.chat("tiny-chat", messages=user("[[reply: <think>Greet.</think>Hello]]"))
    assert (r.message.thinking, r.message.content) == ("Greet.", "Hello")
    r = c.chat("tiny-chat", messages=user("[[reply: <think>Greet.</think>Hello]]"), think=False)
    assert (r.message.thinking, r.message.content) == (None, "Hello")
    with pytest.raises(ollama.ResponseError) as err:
        c.chat("tiny-chat", messages=user("Hi"), format={"type": "object", "enum": []})
    assert err.value.status_code == 400 and "format" in err.value.error


def test_generate_whole_streamed_raw_and_system(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    r = c.generate("tiny-chat", "Hi", system="Be brief.")
    assert r.response == DEFAULT_REPLY and r.done and r.done_reason == "stop"
    parts = list(c.generate("tiny-chat", "[[count: 4]]", stream=True))
    assert "".join(p.response or "" for p in parts) == "n1 n2 n3 n4" and parts[-1].done
    assert c.generate("tiny-chat", "[[count: 2]]", raw=True).response == "n1 n2"
    for bad in ({"suffix": "x"}, {"template": "{{ .Prompt }}"}, {"context": [1, 2]}):
        r = httpx.post(fake_server.base_url + "/api/generate",
                       json={"model": "tiny-chat", "prompt": "Hi"} | bad)
        assert r.status_code == 400 and list(bad)[0] in r.json()["error"]


def test_an_empty_request_loads_and_keep_alive_0_unloads(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    assert c.generate("tiny-chat", "").done_reason == "load"
    assert [m.model for m in c.ps().models] == ["tiny-chat:latest"]
    assert c.generate("tiny-chat", "", keep_alive=0).done_reason == "unload"
    assert c.ps().models == []
    # keep_alive 0 with a prompt: the answer, then the model goes
    assert c.chat("tiny-chat", messages=user("Hi"), keep_alive=0).message.content
    assert c.ps().models == []
    c.chat("tiny-chat", messages=[], keep_alive="10m")
    ttl = fake_server.models.find_loaded("tiny-chat").ttl_s
    assert ttl == 600
    c.chat("tiny-chat", messages=[], keep_alive=-1)
    assert fake_server.models.find_loaded("tiny-chat").ttl_s is None
    with pytest.raises(ollama.ResponseError) as err:
        c.chat("tiny-chat", messages=[], keep_alive="soon")
    assert err.value.status_code == 400 and "keep_alive" in err.value.error


def test_a_failure_mid_stream_is_an_error_line(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    with pytest.raises(ollama.ResponseError) as err:
        list(c.chat("tiny-chat", messages=user("[[fail]]"), stream=True))
    assert "failed" in err.value.error.lower()


def test_go_durations() -> None:
    assert parse_duration("5m") == 300 and parse_duration("1h30m") == 5400
    assert parse_duration("-1s") == -1 and parse_duration("300ms") == 0.3
    assert parse_duration("5") is None and parse_duration("m") is None
    assert parse_duration("") is None


# -- embeddings -----------------------------------------------------------------------------

def test_embed_and_the_older_embeddings(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    r = c.embed("tiny-chat", ["one", "two words"])
    assert len(r.embeddings) == 2 and r.embeddings[0] != r.embeddings[1]
    assert r.model == "tiny-chat" and (r.prompt_eval_count or 0) == 3
    assert len(c.embed("tiny-chat", "one").embeddings) == 1
    assert list(c.embeddings("tiny-chat", "one").embedding) == r.embeddings[0]
    with pytest.raises(ollama.ResponseError) as err:
        c.embed("tiny-chat", [""])
    assert err.value.status_code == 400


# -- pull and delete ------------------------------------------------------------------------

@pytest.mark.usefixtures("hub")
def test_pull_streams_ollamas_status_lines(fake_server: ThreadServer) -> None:
    c = client(fake_server)
    before = {m.model for m in c.list().models}
    statuses = [p.status for p in c.pull("hf.co/acme/Tiny-GGUF:Q4_K_M", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert len({m.model for m in c.list().models} - before) == 1
    assert c.pull("hf.co/acme/Tiny-GGUF:Q4_K_M").status == "success"  # already here
    with pytest.raises(ollama.ResponseError) as err:
        c.pull("acme/Tiny-GGUF@Q4@Q8")
    assert err.value.status_code == 400 and "@" in err.value.error


def test_pull_names() -> None:
    assert pull_target("hf.co/bartowski/Foo-GGUF:Q4_K_M") == "bartowski/Foo-GGUF@Q4_K_M"
    assert pull_target("huggingface.co/a/b:latest") == "a/b"
    assert pull_target("smollm2:135m") == "smollm2-135m-instruct"
    assert pull_target("qwen2.5-coder-0.5b-instruct:latest") == "qwen2.5-coder-0.5b-instruct"


def test_delete_removes_the_file_and_unloads(fake_server: ThreadServer,
                                             fake_models: Path) -> None:
    c = client(fake_server)
    c.chat("other-model", messages=user("Hi"))
    # a delete never guesses: a fuzzy name is not found
    with pytest.raises(ollama.ResponseError):
        c.delete("other")
    assert c.delete("other-model:latest").status == "success"
    assert not (fake_models / "acme").exists()
    assert "other-model:latest" not in {m.model for m in c.list().models}
    assert c.ps().models == []
    r = httpx.request("DELETE", fake_server.base_url + "/api/delete",
                      content=json.dumps({"model": "other-model"}),
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 404 and "other-model" in r.json()["error"]

