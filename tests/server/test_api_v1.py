"""LM Studio's REST API v1 (``/api/v1/*``) on the fake engine, with httpx, against the shapes
LM Studio documents (shared/reference/lms.md §4.2)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from lmscli.engine.fake import DEFAULT_REPLY
from lmscli.server import models as models_module
from tests.catalog.test_fetch import FakeHub
from tests.conftest import ThreadServer
from tests.gguf_factory import make_gguf


def post(server: ThreadServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=30)


def sse_events(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """(event, data) pairs; each data also names its type."""
    out = []
    for block in response.text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(lines["data"])
        assert data["type"] == lines["event"]
        out.append((lines["event"], data))
    return out


# -- chat -----------------------------------------------------------------------------------

def test_chat_whole_answer_and_stats(fake_server: ThreadServer) -> None:
    r = post(fake_server, "/api/v1/chat", {"model": "tiny-chat", "input": "Hello",
                                           "system_prompt": "Be brief.", "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["model_instance_id"] == "tiny-chat"
    assert body["output"] == [{"type": "message", "content": DEFAULT_REPLY}]
    stats = body["stats"]
    assert stats["total_output_tokens"] == 6 and stats["input_tokens"] > 0
    assert stats["reasoning_output_tokens"] == 0
    assert stats["tokens_per_second"] > 0 and stats["time_to_first_token_seconds"] > 0
    assert stats["model_load_time_seconds"] >= 0  # this request loaded the model
    assert body["response_id"].startswith("resp_")
    again = post(fake_server, "/api/v1/chat", {"model": "tiny-chat", "input": "Hi"}).json()
    assert "model_load_time_seconds" not in again["stats"]


def test_chat_items_sampling_and_limits(fake_server: ThreadServer) -> None:
    r = post(fake_server, "/api/v1/chat", {
        "model": "tiny-chat", "max_output_tokens": 3, "top_k": 5, "top_p": 0.5, "min_p": 0.1,
        "repeat_penalty": 1.2, "reasoning": "off", "store": False,
        "input": [{"type": "message", "content": "[[count: 9]]"}]})
    body = r.json()
    assert body["output"][0]["content"] == "n1 n2 n3 "
    assert "response_id" not in body


def test_previous_response_id_continues_the_conversation(fake_server: ThreadServer) -> None:
    first = post(fake_server, "/api/v1/chat", {"model": "tiny-chat",
                                               "input": "[[reply: I am Ada.]]"}).json()
    second = post(fake_server, "/api/v1/chat", {
        "model": "tiny-chat", "input": "[[count: 2]]",
        "previous_response_id": first["response_id"]}).json()
    # the earlier turns are in the prompt: more input tokens than the turn alone
    alone = post(fake_server, "/api/v1/chat", {"model": "tiny-chat",
                                               "input": "[[count: 2]]"}).json()
    assert second["stats"]["input_tokens"] > alone["stats"]["input_tokens"]
    assert second["response_id"] != first["response_id"]
    r = post(fake_server, "/api/v1/chat", {"model": "tiny-chat", "input": "x",
                                           "previous_response_id": "resp_nope"})
    assert r.status_code == 404
    assert r.json()["error"]["type"] == "invalid_request"
    assert r.json()["error"]["code"] == "response_not_found"


def test_streamed_chat_events_in_order(fake_server: ThreadServer) -> None:
    r = post(fake_server, "/api/v1/chat", {"model": "tiny-chat", "input": "[[count: 4]]",
                                           "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r)
    kinds = [k for k, _ in events]
    assert kinds[:3] == ["chat.start", "model_load.start", "model_load.progress"]
    load_end = kinds.index("model_load.end")
    assert events[load_end][1]["load_time_seconds"] >= 0
    rest = [k for k in kinds[load_end + 1:] if k not in ("prompt_processing.progress",
                                                         "message.delta")]
    assert rest == ["prompt_processing.start", "prompt_processing.end", "message.start",
                    "message.end", "chat.end"]
    text = "".join(d["content"] for k, d in events if k == "message.delta")
    result = events[-1][1]["result"]
    assert text == result["output"][0]["content"] == "n1 n2 n3 n4"
    assert events[0][1] == {"type": "chat.start", "model_instance_id": "tiny-chat"}
    progress = [d["progress"] for k, d in events if k == "prompt_processing.progress"]
    assert progress and progress[-1] == 1.0


def test_chat_errors_in_v1_shape(fake_server: ThreadServer) -> None:
    cases = [
        ({"model": "nope", "input": "x"}, 404, "model_not_found"),
        ({"model": "tiny-chat"}, 400, "invalid_request"),
        ({"model": "tiny-chat", "input": ""}, 400, "invalid_request"),
        ({"model": "tiny-chat", "input": "x", "temperature": 9}, 400, "invalid_request"),
        ({"model": "tiny-chat", "input": "x", "reasoning": "max"}, 400, "invalid_request"),
        ({"model": "tiny-chat", "input": [{"type": "image", "data_url": "data:x"}]}, 400,
         "invalid_request"),
        ({"model": "tiny-chat", "input": "x", "integrations": ["mcp/playwright"]}, 400,
         "plugin_connection_error"),  # not in mcp.json
        ({"model": "tiny-chat", "input": "x", "integrations": ["lmstudio/js-code-sandbox"]},
         400, "not_implemented"),
    ]
    for body, status, kind in cases:
        r = post(fake_server, "/api/v1/chat", body)
        assert r.status_code == status, body
        assert r.json()["error"]["type"] == kind and r.json()["error"]["message"], body
    r = post(fake_server, "/api/v1/chat", {"model": "nope", "input": "x", "stream": True})
    ((kind, data),) = sse_events(r)
    assert kind == "error" and data["error"]["type"] == "model_not_found"


def test_failed_prediction_mid_stream_is_an_error_event(fake_server: ThreadServer) -> None:
    r = post(fake_server, "/api/v1/chat", {"model": "tiny-chat", "input": "[[fail]]",
                                           "stream": True})
    kinds = [k for k, _ in sse_events(r)]
    assert kinds[-1] == "error" and "chat.end" not in kinds


# -- models ---------------------------------------------------------------------------------

def test_models_load_list_unload(fake_server: ThreadServer) -> None:
    r = post(fake_server, "/api/v1/models/load", {"model": "tiny-chat", "context_length": 128,
                                                  "flash_attention": True,
                                                  "echo_load_config": True})
    body = r.json()
    assert body["type"] == "llm" and body["status"] == "loaded"
    assert body["instance_id"] == "tiny-chat" and body["load_time_seconds"] >= 0
    assert body["load_config"]["context_length"] == 128
    models = {m["key"]: m for m in httpx.get(fake_server.base_url + "/api/v1/models")
              .json()["models"]}
    assert set(models) == {"tiny-chat", "tiny-chat-large", "other-model"}
    tiny = models["tiny-chat"]
    assert tiny["loaded_instances"] == [{"id": "tiny-chat", "config": {"context_length": 128,
                                                                       "parallel": 4}}]
    assert tiny["type"] == "llm" and tiny["format"] == "gguf" and tiny["publisher"] == "test"
    assert tiny["display_name"] == "Tiny Chat" and tiny["max_context_length"] == 256
    assert tiny["quantization"] == {"name": "F32", "bits_per_weight": 32}  # from the file
    assert tiny["capabilities"] == {"vision": False, "trained_for_tool_use": False}
    assert models["other-model"]["loaded_instances"] == []
    r = post(fake_server, "/api/v1/models/unload", {"instance_id": "tiny-chat"})
    assert r.json() == {"instance_id": "tiny-chat"}
    r = post(fake_server, "/api/v1/models/unload", {"instance_id": "tiny-chat"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
    r = post(fake_server, "/api/v1/models/load", {"model": "tiny-chat",
                                                  "context_length": 100000})
    assert r.status_code == 400 and r.json()["error"]["param"] == "context_length"


def test_a_load_of_a_loaded_model_answers_with_it(fake_server: ThreadServer,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """As LM Studio: no new instance per call, unless another context length is asked for;
    and a model has at most so many instances."""
    monkeypatch.setattr(models_module, "MAX_INSTANCES_PER_MODEL", 2)

    def load(**body: Any) -> httpx.Response:
        return post(fake_server, "/api/v1/models/load", {"model": "tiny-chat"} | body)

    def instances() -> list[str]:
        listing = httpx.get(fake_server.base_url + "/api/v1/models").json()["models"]
        tiny = next(m for m in listing if m["key"] == "tiny-chat")
        return [i["id"] for i in tiny["loaded_instances"]]

    assert load(context_length=128).json()["instance_id"] == "tiny-chat"
    for body in ({}, {"context_length": 128}, {"flash_attention": True}):
        again = load(**body)
        assert again.status_code == 200 and again.json()["instance_id"] == "tiny-chat"
    assert instances() == ["tiny-chat"]
    assert load(context_length=64).json()["instance_id"] == "tiny-chat:2"
    assert load(context_length=64).json()["instance_id"] == "tiny-chat:2"
    refused = load(context_length=32)
    assert refused.status_code == 409, refused.text
    assert refused.json()["error"]["message"] == (
        "tiny-chat is loaded 2 times, the most one model may be. Use one of its instances "
        "(tiny-chat, tiny-chat:2) or unload one first: lms unload <identifier>")
    assert instances() == ["tiny-chat", "tiny-chat:2"]


# -- downloads ------------------------------------------------------------------------------

@pytest.fixture
def hub(fake_server: ThreadServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    data = make_gguf(tmp_path / "hf" / "Tiny-Q4_K_M.gguf", n_params=20_000,
                     file_type=15).read_bytes()
    fake = FakeHub(tmp_path, "acme/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": data})
    monkeypatch.setitem(sys.modules, "huggingface_hub", fake.module)
    return fake


def test_download_job_completes_and_reports_progress(fake_server: ThreadServer,
                                                     hub: FakeHub) -> None:
    job = post(fake_server, "/api/v1/models/download", {"model": "acme/Tiny-GGUF"}).json()
    assert job["job_id"].startswith("job_") and job["started_at"].endswith("Z")
    url = fake_server.base_url + f"/api/v1/models/download/status/{job['job_id']}"
    deadline = time.monotonic() + 10
    while (status := httpx.get(url).json())["status"] == "downloading" \
            and time.monotonic() < deadline:
        time.sleep(0.05)
    size = len(hub.files["Tiny-Q4_K_M.gguf"])
    assert status["status"] == "completed"
    assert status["total_size_bytes"] == status["downloaded_bytes"] == size
    assert status["completed_at"].endswith("Z") and status["bytes_per_second"] >= 0
    keys = {m["key"] for m in httpx.get(fake_server.base_url + "/api/v1/models")
            .json()["models"]}
    assert status["model"] in keys
    again = post(fake_server, "/api/v1/models/download", {"model": "acme/Tiny-GGUF"}).json()
    assert again["status"] == "already_downloaded"


def test_download_errors(fake_server: ThreadServer, hub: FakeHub) -> None:
    r = post(fake_server, "/api/v1/models/download", {"model": "acme/Tiny-GGUF",
                                                      "quantization": "Q8_0"})
    assert r.status_code == 404 and r.json()["error"]["type"] == "model_not_found"
    assert "no Q8_0 file" in r.json()["error"]["message"]
    r = post(fake_server, "/api/v1/models/download", {"model": "not a model!"})
    assert r.status_code in (400, 404)
    r = httpx.get(fake_server.base_url + "/api/v1/models/download/status/job_nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "job_not_found"
