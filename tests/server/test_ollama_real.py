"""Ollama's API on a real server and real models, with the official ``ollama`` client as the
test client: the default model for listings, chat, generate, formats, embeddings, pull,
delete and keep_alive; Qwen2.5-Coder 0.5B for tool calls, whole and streamed, and the
answer after the tool's result (the calls recovered from the JSON it writes)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import ollama
import pytest

from tests.conftest import (
    DEFAULT_MODEL_REL,
    QWEN_MODEL,
    QWEN_MODEL_REL,
    ProcessServer,
    link_model,
)
from tests.server.test_ollama_api import client as ollama_client
from tests.server.test_ollama_api import user
from tests.server.test_tooluse_qwen_real import DATE, DOCS_MESSAGES
from tests.server.test_tooluse_real import DELIVERY

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"
GREEDY = {"temperature": 0, "num_predict": 24}
QWEN = {"temperature": 0, "num_predict": 80, "num_ctx": 4096}  # not its trained 32k
COPY_REL = "test/Spare-GGUF/spare.Q4_1.gguf"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, default_model_file: Path,
           qwen_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("ollama-home")
    link_model(home, default_model_file, DEFAULT_MODEL_REL)
    link_model(home, default_model_file, COPY_REL)
    link_model(home, qwen_model_file, QWEN_MODEL_REL)
    server = ProcessServer(home)
    yield server
    server.stop()


def client(server: ProcessServer) -> ollama.Client:
    return ollama_client(server, timeout=300)  # a real model may load first


def test_listings_describe_the_real_files(server: ProcessServer) -> None:
    c = client(server)
    models = {m.model: m for m in c.list().models}
    assert {f"{MODEL}:latest", f"{QWEN_MODEL}:latest", "spare:latest"} <= set(models)
    smol = models[f"{MODEL}:latest"].details
    assert smol and (smol.family, smol.quantization_level) == ("llama", "Q4_1")
    assert smol.parameter_size and "135" in smol.parameter_size
    shown = c.show(f"{QWEN_MODEL}:latest")
    assert {"completion", "tools"} <= set(shown.capabilities or [])
    assert shown.modelinfo and shown.modelinfo["qwen2.context_length"] == 32768
    assert "<tool_call>" in (shown.template or "")


def test_chat_whole_and_streamed_agree(server: ProcessServer) -> None:
    c = client(server)
    whole = c.chat(MODEL, messages=user("Name three colours."), options=GREEDY)
    assert whole.message.content and whole.done_reason in ("stop", "length")
    assert whole.eval_count and whole.prompt_eval_count and whole.eval_duration
    parts = list(c.chat(MODEL, messages=user("Name three colours."), options=GREEDY,
                        stream=True))
    assert "".join(p.message.content or "" for p in parts) == whole.message.content
    assert parts[-1].done and parts[-1].eval_count == whole.eval_count
    running = {m.model: m for m in c.ps().models}
    assert running[f"{MODEL}:latest"].context_length


def test_generate_and_a_json_schema_format(server: ProcessServer) -> None:
    c = client(server)
    assert c.generate(MODEL, "The sky is", options=GREEDY).response
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                               "age": {"type": "integer"}},
              "required": ["name", "age"]}
    r = c.chat(MODEL, messages=user("Invent a person."), format=schema,
               options={"temperature": 0, "num_predict": 60})
    person = json.loads(r.message.content or "")
    assert isinstance(person["name"], str) and isinstance(person["age"], int)
    # "json": any JSON value (cut short here by the token limit)
    answer = c.generate(MODEL, "Two numbers:", format="json", options=GREEDY).response
    assert (answer or " ").lstrip()[0] in '{["-0123456789tfn'



def test_qwen_calls_the_tool_then_answers_with_its_result(server: ProcessServer) -> None:
    c = client(server)
    r = c.chat(QWEN_MODEL, messages=DOCS_MESSAGES, tools=[DELIVERY], options=QWEN)
    calls = r.message.tool_calls or []
    assert [(t.function.name, dict(t.function.arguments)) for t in calls] == \
        [("get_delivery_date", {"order_id": "1017"})]
    assert "{" not in (r.message.content or "")  # the call came as a call, not as text
    streamed = [t for p in c.chat(QWEN_MODEL, messages=DOCS_MESSAGES, tools=[DELIVERY],
                                  options=QWEN, stream=True)
                for t in p.message.tool_calls or []]
    assert [t.function.name for t in streamed] == ["get_delivery_date"]
    history = [*DOCS_MESSAGES, {"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "get_delivery_date", "arguments": {"order_id": "1017"}}}]},
        {"role": "tool", "tool_name": "get_delivery_date",
         "content": json.dumps({"order_id": "1017", "delivery_date": DATE})}]
    final = c.chat(QWEN_MODEL, messages=history, options=QWEN)
    assert "2024-11-19" in (final.message.content or "")


def test_embed_gives_unit_vectors(server: ProcessServer) -> None:
    r = client(server).embed(MODEL, ["a cat", "a dog"])
    assert len(r.embeddings) == 2 and len(r.embeddings[0]) == 576
    assert math.isclose(sum(v * v for v in r.embeddings[0]), 1.0, rel_tol=1e-3)


def test_pull_delete_and_keep_alive(server: ProcessServer) -> None:
    c = client(server)
    statuses = [p.status for p in c.pull("smollm2:135m", stream=True)]  # already here
    assert statuses[-1] == "success"
    c.generate("spare", "", keep_alive="1h")
    assert "spare:latest" in {m.model for m in c.ps().models}
    assert c.delete("spare:latest").status == "success"  # unloads it first
    assert not (server.home / "models" / COPY_REL).exists()
    assert "spare:latest" not in {m.model for m in c.list().models}
    assert "spare:latest" not in {m.model for m in c.ps().models}
    c.generate(MODEL, "Hi", options={"num_predict": 2}, keep_alive=0)
    assert f"{MODEL}:latest" not in {m.model for m in c.ps().models}
