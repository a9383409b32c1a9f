"""LM Studio's REST API v1 on a real server with the default model, driven with httpx."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import ProcessServer

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"


def chat(server: ProcessServer, **body: Any) -> httpx.Response:
    return httpx.post(server.base_url + "/api/v1/chat", timeout=120,
                      json={"model": MODEL, "temperature": 0, "max_output_tokens": 24} | body)


def test_models_list_shape(real_server: ProcessServer) -> None:
    (model,) = httpx.get(real_server.base_url + "/api/v1/models").json()["models"]
    assert model["key"] == MODEL and model["type"] == "llm" and model["format"] == "gguf"
    assert model["architecture"] == "llama" and model["max_context_length"] == 8192
    assert model["quantization"] == {"name": "Q4_1", "bits_per_weight": 4}
    assert model["size_bytes"] == 98_362_432 and model["params_string"] == "135M"


def test_streamed_chat_loads_the_model_just_in_time(real_server: ProcessServer) -> None:
    httpx.post(real_server.base_url + "/lmscli/models/unload", json={"all": True})
    r = chat(real_server, input="What is the capital of France?", stream=True,
             system_prompt="Answer in one word.")
    events = []
    for block in r.text.strip().split("\n\n"):
        head, data = block.split("\n", 1)
        events.append((head.removeprefix("event: "), json.loads(data.removeprefix("data: "))))
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["chat.start", "model_load.start"] and "model_load.progress" in kinds
    assert kinds.index("model_load.end") < kinds.index("prompt_processing.start")
    assert kinds[-2:] == ["message.end", "chat.end"]
    assert "prompt_processing.progress" in kinds
    result = events[-1][1]["result"]
    text = "".join(d["content"] for k, d in events if k == "message.delta")
    assert text and text == result["output"][0]["content"]
    stats = result["stats"]
    assert 0 < stats["total_output_tokens"] <= 24 and stats["model_load_time_seconds"] > 0
    assert stats["time_to_first_token_seconds"] > 0 and stats["tokens_per_second"] > 0


def test_previous_response_id_carries_the_history(real_server: ProcessServer) -> None:
    first = chat(real_server, input="My name is Ada. Say hello to me.").json()
    second = chat(real_server, input="What is my name?",
                  previous_response_id=first["response_id"]).json()
    turn_alone = chat(real_server, input="What is my name?", store=False).json()
    # the prompt holds the first turn and its answer, not only the new question
    assert second["stats"]["input_tokens"] >= turn_alone["stats"]["input_tokens"] + \
        first["stats"]["total_output_tokens"]
    assert "response_id" not in turn_alone
