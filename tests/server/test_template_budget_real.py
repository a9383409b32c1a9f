"""A hostile chat template holds up only its own model (issue 22), on a real server: a copy
of the default model's GGUF whose template loops, written with the ``gguf`` package, gets 12
requests at once while plain chats go to the healthy default model."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import gguf
import httpx
import pytest
from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

from tests.conftest import ProcessServer, link_default_model

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"
HOSTILE = "loop-smol"
LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


def with_template(src: Path, dst: Path, template: str) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {gguf.Keys.Tokenizer.CHAT_TEMPLATE: MetadataDetails(
        gguf.GGUFValueType.STRING, template)}, [])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           default_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("template-home")
    link_default_model(home, default_model_file)
    with_template(default_model_file,
                  home / "models/test/loop-smol-GGUF/loop-smol.Q4_1.gguf", LOOP)
    server = ProcessServer(home)
    for model in (MODEL, HOSTILE):
        assert server.lms("load", model, "-c", "512", "-y").returncode == 0
    yield server
    server.stop()


def chat(server: ProcessServer, model: str) -> httpx.Response:
    return httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "model": model, "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "user", "content": "hi"}]})


def timed(server: ProcessServer) -> tuple[int, float]:
    started = time.monotonic()
    status = chat(server, MODEL).status_code
    return status, time.monotonic() - started


def test_a_looping_template_leaves_other_models_alone(server: ProcessServer) -> None:
    alone = statistics.median(timed(server)[1] for _ in range(5))
    hostile: list[httpx.Response] = []
    workers = [threading.Thread(target=lambda: hostile.append(chat(server, HOSTILE)))
               for _ in range(12)]
    for worker in workers:
        worker.start()
    healthy = []
    while any(worker.is_alive() for worker in workers):
        healthy.append(timed(server))
    assert len(healthy) >= 5
    assert {status for status, _ in healthy} == {200}
    slowest = max(took for _, took in healthy)
    # before: a healthy chat waited 12 s, or failed with the hostile model's 400
    assert slowest < max(1.5, 10 * alone), (alone, slowest)
    assert [r.status_code for r in hostile] == [400] * 12
    assert {r.json()["error"]["code"] for r in hostile} == {"template_error"}
