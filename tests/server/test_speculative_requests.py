"""Speculative decoding's request fields, on every API, reach the engine: ``speculative``,
``draft_model``, ``draft_max_tokens`` and ``draft_min_tokens`` in each prediction's request,
the draft settings of a load in its options; bad values are 400s (404 for an unknown draft
model) in each API's error shape. The engine's drafting itself is tested in tests/engine."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import lmstudio
import pytest

import lmscli as lms
from lmscli.cli.render import stats_lines
from lmscli.client.results import LlmPredictionStats
from lmscli.engine import DraftModel, LoadOptions, PredictionRequest, PredictionStats
from lmscli.engine.base import ModelInstance
from lmscli.engine.fake import FakeEngine
from lmscli.errors import ModelNotFoundError, ServerError, UserInputError
from lmscli.server.apis.openai_api import draft_stats
from lmscli.server.links.forward import upstream_body
from lmscli.server.links.registry import LinkTarget
from lmscli.server.links.turn import chat_payload
from lmscli.server.pipeline.turns import RequestParams, TurnInput
from lmscli.server.sdk.kvconfig import load_fields
from tests.conftest import ThreadServer
from tests.gguf_factory import make_gguf
from tests.server.test_sdk import predict_message, raw, recv

DRAFT = "tiny-chat-large"
USER = [{"role": "user", "content": "hi"}]


class RecordingInstance(ModelInstance):
    requests: list[PredictionRequest]

    def submit(self, request: PredictionRequest, sink: Any) -> Any:
        self.requests.append(request)
        # what the engine does with a draft model is tests/engine's: here it answers plainly
        return super().submit(dataclasses.replace(request, draft_model=None), sink)


class RecordingEngine(FakeEngine):
    """The fake engine, keeping every prediction request and load options it got."""

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[PredictionRequest] = []
        self.loads: list[LoadOptions] = []

    def create(self, spec: Any, options: LoadOptions) -> ModelInstance:
        instance = RecordingInstance(spec, options, self.backend(spec, options))
        instance.requests = self.requests
        return instance

    def load(self, spec: Any, options: LoadOptions, on_progress: Any = None) -> Any:
        self.loads.append(options)
        # loaded without its draft model (the engine's part), yet showing what was asked
        instance = super().load(spec, dataclasses.replace(options, draft_model=None),
                                on_progress)
        instance.options = options
        return instance


@pytest.fixture
def engine() -> RecordingEngine:
    return RecordingEngine()


@pytest.fixture
def server(fake_models: Path, engine: RecordingEngine) -> Iterator[ThreadServer]:
    make_gguf(fake_models / "test/embed-GGUF/embed.gguf", arch="nomic-bert", chat_template=None)
    server = ThreadServer(engine)
    yield server
    server.stop()


def post(server: ThreadServer, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(server.base_url + path, json=body, timeout=30)


def draft_of(fake_models: Path) -> DraftModel:
    return DraftModel(str(fake_models / "test/tiny-chat-large-GGUF/tiny-chat-large.Q8_0.gguf"),
                      DRAFT)


# every prediction route, with a body that carries speculative=VALUE
ROUTES: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"messages": USER, "speculative": "VALUE"}),
    ("/v1/completions", {"prompt": "Once", "speculative": "VALUE"}),
    ("/v1/responses", {"input": "hi", "speculative": "VALUE"}),
    ("/api/v0/chat/completions", {"messages": USER, "speculative": "VALUE"}),
    ("/api/v0/completions", {"prompt": "Once", "speculative": "VALUE"}),
    ("/api/v1/chat", {"input": "hi", "speculative": "VALUE"}),
    ("/v1/messages", {"messages": USER, "max_tokens": 16, "speculative": "VALUE"}),
    ("/api/chat", {"messages": USER, "stream": False, "options": {"speculative": "VALUE"}}),
    ("/api/generate", {"prompt": "hi", "stream": False, "options": {"speculative": "VALUE"}}),
]


def with_value(body: dict[str, Any], value: str) -> dict[str, Any]:
    return {"model": "tiny-chat"} | json.loads(json.dumps(body).replace("VALUE", value))


def error_message(path: str, response: httpx.Response) -> str:
    """The message of an error, in each API's shape."""
    body = response.json()
    return body["error"] if path.startswith("/api/chat") or path.startswith("/api/generate") \
        else body["error"]["message"]


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[r[0] for r in ROUTES])
def test_each_api_passes_speculative_to_the_engine(server: ThreadServer,
                                                   engine: RecordingEngine, path: str,
                                                   body: dict[str, Any]) -> None:
    for value in ("ngram", "off"):
        r = post(server, path, with_value(body, value))
        assert r.status_code == 200, r.text
        assert engine.requests[-1].speculative == value
    plain = {k: v for k, v in with_value(body, "off").items() if k != "speculative"}
    plain.pop("options", None)
    assert post(server, path, plain).status_code == 200
    assert engine.requests[-1].speculative is None  # the model's load setting
    assert engine.requests[-1].draft_model is None
    assert (engine.requests[-1].draft_max, engine.requests[-1].draft_min) == (None, None)


def with_fields(path: str, body: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """A route's body with ``fields`` where it takes ``speculative`` (Ollama's options)."""
    out = with_value(body, "ngram")
    if "options" in out:
        out["options"] |= fields
    else:
        out |= fields
    return out


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[r[0] for r in ROUTES])
def test_each_api_passes_draft_lengths_to_the_engine(server: ThreadServer,
                                                     engine: RecordingEngine, path: str,
                                                     body: dict[str, Any]) -> None:
    r = post(server, path, with_fields(path, body, draft_max_tokens=3, draft_min_tokens=1))
    assert r.status_code == 200, r.text
    assert (engine.requests[-1].draft_max, engine.requests[-1].draft_min) == (3, 1)
    r = post(server, path, with_fields(path, body, draft_min_tokens=0))  # any draft counts
    assert r.status_code == 200, r.text
    assert (engine.requests[-1].draft_max, engine.requests[-1].draft_min) == (None, 0)


@pytest.mark.parametrize(("path", "body"), ROUTES, ids=[r[0] for r in ROUTES])
def test_bad_draft_lengths_are_a_400_naming_the_field(server: ThreadServer, path: str,
                                                      body: dict[str, Any]) -> None:
    where = "options." if "options" in body else ""
    for fields, message in [
            ({"draft_max_tokens": 0}, f"'{where}draft_max_tokens' must be at least 1"),
            ({"draft_min_tokens": -1}, f"'{where}draft_min_tokens' must be at least 0"),
            ({"draft_max_tokens": "3"}, f"'{where}draft_max_tokens' must be an integer"),
            ({"draft_max_tokens": 2, "draft_min_tokens": 3},
             f"'{where}draft_min_tokens' (3) must not be more than '{where}draft_max_tokens' "
             "(2)")]:
        r = post(server, path, with_fields(path, body, **fields))
        assert r.status_code == 400, (fields, r.text)
        assert message in error_message(path, r)
    assert server.models.loaded == {}  # refused before a load


def test_a_draft_length_limit_shows_in_the_fragments(server: ThreadServer) -> None:
    """A question asked again drafts its whole answer from the first answer (the model's
    pool), in long fragments; with at most 3 drafted tokens (the client's LM Studio key) it
    still drafts, but no step writes more than those 3 and the token sampled after them.
    lmscli's own route sends each step's fragment as it is: other streams merge them."""
    ask = "Count [[count: 40]]"
    with lms.Client(f"127.0.0.1:{server.port}") as client:
        model = client.llm.model("tiny-chat")

        def fragments(**config: Any) -> tuple[list[int], Any]:
            stream = model.respond_stream(ask, config={"speculativeDecoding": "ngram"} | config)
            return [f.tokens_count for f in stream], stream.result().stats

        first, _ = fragments()
        again, stats = fragments()
        limited, short = fragments(speculativeDecodingNumDraftTokensExact=3)
    assert sum(first) == sum(again) == sum(limited) == 40
    assert max(again) > 4 and stats.accepted_draft_tokens_count >= 30
    assert max(limited) <= 4 and short.accepted_draft_tokens_count >= 20


@pytest.mark.parametrize("path", ["/api/v1/chat", "/api/chat", "/api/generate"])
def test_v1_chat_and_ollama_refuse_unknown_or_embedding_draft_models(
        server: ThreadServer, path: str) -> None:
    body = dict(next(b for p, b in ROUTES if p == path))
    where = "options.draft_model" if "options" in body else "draft_model"
    r = post(server, path, with_fields(path, body, draft_model="nope"))
    assert r.status_code == 404
    assert error_message(path, r) == ("Draft model 'nope' not found. Run `lms ls` to see "
                                      "your models.")
    r = post(server, path, with_fields(path, body, draft_model="embed"))
    assert r.status_code == 400
    assert error_message(path, r).startswith(f"'{where}': embed is an embedding model")
    if path == "/api/v1/chat":  # LM Studio's v1 error body names its kind
        assert r.json()["error"]["param"] == "draft_model"
    assert server.models.loaded == {}  # refused before a load


def test_unknown_or_embedding_draft_models_are_refused(server: ThreadServer) -> None:
    body = {"model": "tiny-chat", "messages": USER}
    r = post(server, "/api/v0/chat/completions", body | {"draft_model": "nope"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["message"] == ("Draft model 'nope' not found. Run `lms ls` to see your "
                                "models.")
    assert (error["param"], error["code"]) == ("draft_model", "model_not_found")
    r = post(server, "/v1/chat/completions", body | {"draft_model": "embed"})
    assert r.status_code == 400 and "embedding model" in r.json()["error"]["message"]
    r = post(server, "/v1/chat/completions", body | {"draft_model": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "draft_model"
    assert server.models.loaded == {}  # refused before a load


def test_v0_stats_name_the_draft_model() -> None:
    stats = PredictionStats("eosFound", draft_tokens=4, accepted_draft_tokens=3,
                            draft_model=DRAFT)
    assert draft_stats(stats) == {"draft_model": DRAFT, "total_draft_tokens_count": 4,
                                  "accepted_draft_tokens_count": 3,
                                  "rejected_draft_tokens_count": 1,
                                  "ignored_draft_tokens_count": 0}
    assert "draft_model" not in draft_stats(PredictionStats("eosFound", draft_tokens=4,
                                                            accepted_draft_tokens=3))
    assert draft_stats(PredictionStats("eosFound")) == {}


# -- lmscli's client and the SDK websocket ---------------------------------------------------

def test_client_config_reaches_the_engine(server: ThreadServer, engine: RecordingEngine,
                                          fake_models: Path) -> None:
    with lms.Client(f"127.0.0.1:{server.port}") as client:
        model = client.llm.model("tiny-chat")
        model.respond("hi", config={"speculativeDecoding": "ngram", "draftModel": DRAFT})
        assert engine.requests[-1].speculative == "ngram"
        assert engine.requests[-1].draft_model == draft_of(fake_models)
        model.respond("hi", config={"speculativeDecodingNumDraftTokensExact": 4,
                                    "speculative_decoding_min_draft_length_to_consider": 2})
        assert (engine.requests[-1].draft_max, engine.requests[-1].draft_min) == (4, 2)
        with pytest.raises(UserInputError, match="speculativeDecoding must be"):
            model.respond("hi", config={"speculativeDecoding": "fast"})
        with pytest.raises(ModelNotFoundError, match="Draft model 'nope' not found"):
            model.respond("hi", config={"draft_model": "nope"})


def test_client_stats_carry_the_draft_model_key() -> None:
    stats = LlmPredictionStats.from_wire({"stopReason": "eosFound", "usedDraftModelKey": DRAFT,
                                          "totalDraftTokensCount": 4,
                                          "acceptedDraftTokensCount": 3})
    assert stats.used_draft_model_key == DRAFT
    lines = stats_lines(stats)
    assert f"  Draft Model: {DRAFT}" in lines
    assert "  Accepted Draft Tokens: 3 of 4 (75%)" in lines
    plain = LlmPredictionStats.from_wire({"stopReason": "eosFound"})
    assert plain.used_draft_model_key is None
    assert not any("Draft" in line for line in stats_lines(plain))


def test_sdk_prediction_config_reaches_the_engine(server: ThreadServer,
                                                  engine: RecordingEngine,
                                                  fake_models: Path) -> None:
    with lmstudio.Client(f"127.0.0.1:{server.port}") as sdk:
        sdk.llm.model("tiny-chat").respond("hi", config={
            "draftModel": DRAFT, "speculativeDecodingNumDraftTokensExact": 3,
            "speculativeDecodingMinDraftLengthToConsider": 2})
    assert engine.requests[-1].draft_model == draft_of(fake_models)
    assert (engine.requests[-1].draft_max, engine.requests[-1].draft_min) == (3, 2)
    with raw(server) as ws:
        ws.send(predict_message("hi", **{"speculativeDecoding.mode": "off"}))
        while (reply := recv(ws))["message"]["type"] != "success":
            pass
        assert engine.requests[-1].speculative == "off"
        echoed = {f["key"]: f["value"] for f in reply["message"]["predictionConfig"]["fields"]}
        assert echoed["llm.prediction.speculativeDecoding.mode"] == "off"
        ws.send(predict_message("hi", 2, **{"speculativeDecoding.mode": "fast"}))
        while (reply := recv(ws))["type"] != "channelError":
            pass
        assert reply["channelId"] == 2
        assert "speculativeDecoding.mode' must be" in reply["error"]["title"]
        ws.send(predict_message("hi", 3, **{"speculativeDecoding.numDraftTokensExact": 2,
                                            "speculativeDecoding.minDraftLengthToConsider": 3}))
        while (reply := recv(ws))["type"] != "channelError":
            pass
        assert "minDraftLengthToConsider' (3) must not be more than" in reply["error"]["title"]
        ws.send(predict_message("hi", 4, **{"speculativeDecoding.numDraftTokensExact": 5}))
        while (reply := recv(ws))["message"]["type"] != "success":
            pass
        assert engine.requests[-1].draft_max == 5
        echoed = {f["key"]: f["value"] for f in reply["message"]["predictionConfig"]["fields"]}
        assert echoed["llm.prediction.speculativeDecoding.numDraftTokensExact"] == 5


# -- linked engines --------------------------------------------------------------------------

def test_linked_engines_get_the_speculative_fields() -> None:
    """A relayed body keeps them as sent; a translated turn (Responses, Messages, /api/v1/chat,
    Ollama) sends those the caller set, the draft model by its key."""
    target = LinkTarget("m", [], "up/m")
    sent = {"model": "up/m", "speculative": "ngram", "draft_model": DRAFT,
            "draft_max_tokens": 3, "draft_min_tokens": 1, "ttl": 60}
    assert upstream_body(sent, target) == {k: v for k, v in sent.items() if k != "ttl"} | {
        "model": "m"}
    params = RequestParams(speculative="ngram", draft_model=DraftModel("/models/d.gguf", DRAFT),
                           draft_max=3)
    payload = chat_payload(target, TurnInput(USER), params)
    assert {k: payload.get(k) for k in ("speculative", "draft_model", "draft_max_tokens")} == {
        "speculative": "ngram", "draft_model": DRAFT, "draft_max_tokens": 3}
    assert "draft_min_tokens" not in payload  # not asked for: the upstream's load setting
    plain = chat_payload(target, TurnInput(USER), RequestParams())
    assert not {"speculative", "draft_model", "draft_max_tokens"} & set(plain)


# -- loads -----------------------------------------------------------------------------------

def test_native_load_takes_draft_settings(server: ThreadServer, engine: RecordingEngine,
                                          fake_models: Path) -> None:
    with lms.Client(f"127.0.0.1:{server.port}") as client:
        info = client.load("tiny-chat", draft_model=DRAFT, draft_max_tokens=8,
                           draft_min_tokens=2)
        options = engine.loads[-1]
        assert (options.draft_model, options.draft_max, options.draft_min) == (
            draft_of(fake_models), 8, 2)
        assert options.speculative == "ngram"  # the server's default
        assert (info["draftModel"], info["draftMaxTokens"], info["draftMinTokens"]) == (
            DRAFT, 8, 2)
        plain = client.load("other-model")
        assert (plain["draftModel"], plain["draftMaxTokens"], plain["draftMinTokens"]) == (
            None, None, 0)


@pytest.mark.parametrize(("fields", "status", "message"), [
    ({"draft_max_tokens": 0}, 400, "'draft_max_tokens' must be at least 1"),
    ({"draft_min_tokens": -1}, 400, "'draft_min_tokens' must be at least 0"),
    ({"draft_max_tokens": 2, "draft_min_tokens": 3}, 400,
     "'draft_min_tokens' (3) must not be more than 'draft_max_tokens' (2)"),
    ({"draft_model": "nope"}, 404, "Draft model 'nope' not found"),
    ({"draft_model": "embed"}, 400, "embedding model"),
])
def test_load_refuses_bad_draft_settings(server: ThreadServer, fields: dict[str, Any],
                                         status: int, message: str) -> None:
    for path in ("/lmscli/models/load", "/api/v1/models/load"):
        r = post(server, path, {"model": "tiny-chat"} | fields)
        assert r.status_code == status, (path, r.text)
        assert message in r.json()["error"]["message"]
    assert server.models.loaded == {}


def test_an_embedding_model_takes_no_draft_settings(server: ThreadServer) -> None:
    with lms.Client(f"127.0.0.1:{server.port}") as client, pytest.raises(ServerError,
                                                               match="embedding model"):
        client.load("embed", draft_max_tokens=4)


def test_api_v1_load_takes_draft_settings(server: ThreadServer, engine: RecordingEngine,
                                          fake_models: Path) -> None:
    body = {"model": "tiny-chat", "draft_model": DRAFT, "draft_max_tokens": 6}
    first = post(server, "/api/v1/models/load", body).json()
    options = engine.loads[-1]
    assert (options.draft_model, options.draft_max, options.draft_min) == (
        draft_of(fake_models), 6, 0)
    # the same settings reuse the instance; others load another, as a context length does
    assert post(server, "/api/v1/models/load", body).json()["instance_id"] == \
        first["instance_id"]
    other = post(server, "/api/v1/models/load", body | {"draft_max_tokens": 3}).json()
    assert other["instance_id"] != first["instance_id"] and engine.loads[-1].draft_max == 3
    plain = post(server, "/api/v1/models/load", {"model": "tiny-chat"}).json()
    assert plain["instance_id"] == first["instance_id"]  # no draft fields: any instance


def load_message(fields: dict[str, Any]) -> str:
    kv = [{"key": f"llm.load.speculativeDecoding.{k}", "value": v} for k, v in fields.items()]
    return json.dumps({"type": "channelCreate", "endpoint": "loadModel", "channelId": 1,
                       "creationParameter": {"modelKey": "tiny-chat", "loadConfigStack": {
                           "layers": [{"layerName": "apiOverride",
                                       "config": {"fields": kv}}]}}})


def test_sdk_load_config_takes_draft_settings(server: ThreadServer, engine: RecordingEngine,
                                              fake_models: Path) -> None:
    with raw(server) as ws:
        ws.send(load_message({"draftModel": DRAFT, "numDraftTokensExact": 5,
                              "minDraftLengthToConsider": 1}))
        while (reply := recv(ws))["message"]["type"] != "success":
            pass
    options = engine.loads[-1]
    assert (options.draft_model, options.draft_max, options.draft_min) == (
        draft_of(fake_models), 5, 1)
    fields = {f["key"]: f["value"] for f in load_fields(server.models.loaded["tiny-chat"],
                                                         "llm")}  # what getLoadConfig says
    assert {k: v for k, v in fields.items() if "speculative" in k} == {
        "llm.load.speculativeDecoding.draftModel": DRAFT,
        "llm.load.speculativeDecoding.numDraftTokensExact": 5,
        "llm.load.speculativeDecoding.minDraftLengthToConsider": 1}
    with raw(server) as ws:
        ws.send(load_message({"numDraftTokensExact": 2, "minDraftLengthToConsider": 3}))
        reply = recv(ws)
        assert reply["type"] == "channelError"
        assert "minDraftLengthToConsider' (3) must not be more than" in reply["error"]["title"]
