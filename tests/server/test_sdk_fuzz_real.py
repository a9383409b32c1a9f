"""Hostile frames on the SDK websockets of a real server with the real engine: malformed
envelopes, wrong ids, unknown endpoints and generated parameters for every endpoint. Every
call and channel must end in its own result or a protocol-shaped error, never an internal
error, and the server must stay up. ``LMSCLI_SDK_FUZZ_EXAMPLES`` (default 150) and
``LMSCLI_SDK_FUZZ_BUDGET_S`` (default 60) bound the run."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from lmscli.server.sdk.routes import namespaces
from tests.conftest import ProcessServer, link_default_model
from tests.server.test_fuzz_real import (
    ANY,
    MESSAGES,
    NAMES,
    ROOT_SCHEMA,
    TEXT,
    VALID_SCHEMA,
    VALID_TOOLS,
    assert_alive,
    to_json,
)

pytestmark = pytest.mark.real
MODEL = "smollm2-135m-instruct"
EXAMPLES = int(os.environ.get("LMSCLI_SDK_FUZZ_EXAMPLES", "150"))
BUDGET_S = float(os.environ.get("LMSCLI_SDK_FUZZ_BUDGET_S", "60"))
AUTH = {"authVersion": 1, "clientIdentifier": "fuzz", "clientPasskey": "fuzz"}
NAMESPACES = namespaces()
# generation stays short whatever the generated stack says: the last layer wins
SHORT = {"layerName": "apiOverride", "config": {"fields": [
    {"key": "llm.prediction.maxPredictedTokens", "value": {"checked": True, "value": 8}}]}}

PREDICTION_KEYS = ["temperature", "maxPredictedTokens", "topKSampling", "topPSampling",
                   "minPSampling", "repeatPenalty", "stopStrings", "structured", "tools",
                   "promptTemplate", "contextOverflowPolicy", "llama.cpuThreads"]
LOAD_KEYS = ["contextLength", "llama.acceleration.offloadRatio", "numParallelSessions", "seed"]
CHECKBOX = st.fixed_dictionaries({"checked": st.one_of(st.booleans(), ANY)},
                                 optional={"value": st.one_of(st.floats(-5, 5), ANY)})
STRUCTURED = st.one_of(
    st.builds(lambda s: {"type": "json", "jsonSchema": s}, st.one_of(ROOT_SCHEMA,
                                                                      VALID_SCHEMA)),
    st.fixed_dictionaries({"type": st.sampled_from(["gbnf", "none", "xml", 3])},
                          optional={"gbnfGrammar": ANY}), ANY)
TOOLS = st.one_of(st.builds(lambda tools, force: {"type": "toolArray", "tools": tools,
                                                  "force": force},
                            st.lists(st.builds(lambda n, p: {"type": "function", "function": {
                                "name": n, "parameters": p}}, NAMES, ROOT_SCHEMA),
                                max_size=2), st.booleans()), ANY)
VALUES = {"structured": STRUCTURED, "tools": TOOLS, "temperature": st.floats(-1, 3),
          "stopStrings": st.lists(st.text(max_size=3), max_size=3)}


def fields(prefix: str, keys: list[str]) -> st.SearchStrategy[Any]:
    key = st.one_of(st.sampled_from([f"{prefix}{k}" for k in keys]), st.text(max_size=10))
    field = key.flatmap(lambda k: st.fixed_dictionaries({"key": st.just(k), "value": st.one_of(
        VALUES.get(k.removeprefix(prefix), ANY), CHECKBOX, ANY)}))
    return st.one_of(st.lists(field, max_size=4), ANY)


def stack(prefix: str, keys: list[str]) -> st.SearchStrategy[Any]:
    layer = st.fixed_dictionaries({"layerName": st.sampled_from(["apiOverride",
                                                                 "completeModeFormatting", "x"]),
                                   "config": st.fixed_dictionaries({"fields": fields(prefix,
                                                                                     keys)})})
    return st.one_of(st.builds(lambda layers: {"layers": layers}, st.lists(layer, max_size=2)),
                     ANY)


SPECIFIER = st.one_of(
    st.just({"type": "query", "query": {"identifier": MODEL}}),
    st.builds(lambda q: {"type": "query", "query": q}, st.dictionaries(
        st.sampled_from(["identifier", "path", "domain", "vision"]), st.one_of(TEXT, ANY),
        max_size=2)),
    st.builds(lambda r: {"type": "instanceReference", "instanceReference": r},
              st.one_of(st.just(MODEL), TEXT, ANY)), ANY)
PART = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": st.one_of(st.text(max_size=20),
                                                                      ANY)}),
    st.fixed_dictionaries({"type": st.just("toolCallRequest"), "toolCallRequest": ANY}),
    st.fixed_dictionaries({"type": st.just("toolCallResult")},
                          optional={"content": ANY, "toolCallId": ANY}),
    st.fixed_dictionaries({"type": st.sampled_from(["file", "x"])}), ANY)
HISTORY = st.one_of(
    st.just({"messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}]}),
    st.builds(lambda ms: {"messages": ms}, st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["user", "system", "assistant", "tool", "x"]),
        "content": st.one_of(st.lists(PART, max_size=3), st.text(max_size=10), ANY)}),
        max_size=3)),
    st.builds(lambda m: {"messages": m}, MESSAGES), ANY)
PREDICT = st.fixed_dictionaries({"modelSpecifier": SPECIFIER, "history": HISTORY}, optional={
    "fuzzyPresetIdentifier": ANY, "predictionConfigStack": stack("llm.prediction.",
                                                                 PREDICTION_KEYS)})
MODEL_PARAMS = st.one_of(st.fixed_dictionaries({}, optional={
    "specifier": SPECIFIER, "modelSpecifier": SPECIFIER, "inputString": st.one_of(
        st.text(max_size=20), ANY), "throwIfNotFound": ANY, "identifier": st.one_of(TEXT, ANY),
    "history": HISTORY, "predictionConfigStack": stack("llm.prediction.", PREDICTION_KEYS)}),
    ANY)
LOAD = st.fixed_dictionaries({}, optional={
    "identifier": st.one_of(st.just(MODEL), TEXT, ANY),
    "modelKey": st.one_of(st.just(MODEL), TEXT, ANY),
    "loadTtlMs": ANY, "ttlMs": ANY,
    "loadConfigStack": st.one_of(stack("llm.load.", LOAD_KEYS),
                                 stack("embedding.load.", LOAD_KEYS))})


def call(namespace: str) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    ns = NAMESPACES[namespace]
    endpoints = st.one_of(st.sampled_from(sorted(ns.rpc) or ["none"]), st.text(max_size=8))
    return st.builds(lambda e, p: (namespace, {"type": "rpcCall", "endpoint": e,
                                               "parameter": p}), endpoints, MODEL_PARAMS)


def channel(namespace: str) -> st.SearchStrategy[tuple[str, dict[str, Any]]]:
    ns = NAMESPACES[namespace]
    endpoint = st.one_of(st.sampled_from(sorted(ns.channels) or ["none"]), st.text(max_size=8))

    def build(e: str, predict: Any, load: Any) -> tuple[str, dict[str, Any]]:
        if e == "predict" and isinstance(predict, dict):
            layers = (predict.get("predictionConfigStack") or {})
            stacked = layers.get("layers") if isinstance(layers, dict) else None
            predict["predictionConfigStack"] = {
                "layers": [*(stacked if isinstance(stacked, list) else []), SHORT]}
        param = predict if e == "predict" else load
        return namespace, {"type": "channelCreate", "endpoint": e, "creationParameter": param}

    return st.builds(build, endpoint, PREDICT, LOAD)


def checked(values: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(values, st.builds(lambda c, v: {"checked": c, "value": v},
                                       st.booleans(), values))


PLAUSIBLE_FIELDS = {
    "temperature": st.floats(0, 2), "topKSampling": st.integers(-1, 100).map(float),
    "topPSampling": checked(st.floats(0, 1)), "minPSampling": checked(st.floats(0, 1)),
    "repeatPenalty": checked(st.floats(0.5, 2)),
    "stopStrings": st.lists(st.text(min_size=1, max_size=3), max_size=3),
    "structured": st.builds(lambda s: {"type": "json", "jsonSchema": s}, VALID_SCHEMA),
    "tools": st.builds(lambda ts, force: {"type": "toolArray", "tools": ts, "force": force},
                       VALID_TOOLS, st.booleans()),
}


def plausible_predict(values: dict[str, Any], complete: bool) -> tuple[str, dict[str, Any]]:
    """Valid settings a careful client sends: these must end in success."""
    if "structured" in values and values.get("tools", {}).get("force"):
        values.pop("tools")  # a forced call and a schema can't both constrain the output
    layers = [{"layerName": "apiOverride", "config": {"fields": [
        {"key": f"llm.prediction.{k}", "value": v} for k, v in values.items()]}}]
    if complete:
        layers.append({"layerName": "completeModeFormatting", "config": {"fields": []}})
    return "llm", {"type": "channelCreate", "endpoint": "predict", "mustSucceed": True,
                   "creationParameter": {
                       "modelSpecifier": {"type": "query", "query": {"identifier": MODEL}},
                       "history": {"messages": [{"role": "user", "content": [
                           {"type": "text", "text": "Say hi."}]}]},
                       "predictionConfigStack": {"layers": [*layers, SHORT]}}}


PLAUSIBLE = st.builds(plausible_predict, st.fixed_dictionaries({}, optional=PLAUSIBLE_FIELDS),
                      st.booleans())
GARBAGE = st.builds(lambda ns, m: (ns, m), st.sampled_from(sorted(NAMESPACES)), st.one_of(
    ANY, st.fixed_dictionaries({"type": st.sampled_from(
        ["rpcCall", "channelCreate", "channelSend", "keepAlive", "signalSubscribe", "x"])},
        optional={"callId": ANY, "channelId": ANY, "endpoint": ANY, "message": ANY})))
FRAMES = st.one_of(*[call(ns) for ns in NAMESPACES], *[channel(ns) for ns in NAMESPACES],
                   GARBAGE, PLAUSIBLE)


class Sockets:
    """One authenticated socket per namespace, reopened if the server closed it."""

    def __init__(self, server: ProcessServer) -> None:
        self.server = server
        self.open: dict[str, ClientConnection] = {}
        self.ids = itertools.count(1)
        self.stack = ExitStack()
        self.sent: list[str] = []  # the frames so far, to tell which one a stall follows

    def get(self, namespace: str) -> ClientConnection:
        if namespace not in self.open:
            ws = self.stack.enter_context(
                connect(f"ws://127.0.0.1:{self.server.port}/{namespace}"))
            ws.send(json.dumps(AUTH))
            assert json.loads(ws.recv(timeout=10)) == {"success": True}
            self.open[namespace] = ws
        return self.open[namespace]

    def close(self) -> None:
        self.stack.close()


def exchange(sockets: Sockets, namespace: str, frame: Any) -> list[str]:
    """Send one frame; read until its call or channel ended. Returns the failures seen."""
    ws = sockets.get(namespace)
    key = None
    if isinstance(frame, dict) and frame.get("type") in ("rpcCall", "channelCreate"):
        key = "callId" if frame["type"] == "rpcCall" else "channelId"
        frame = frame | {key: next(sockets.ids)}
    must_succeed = isinstance(frame, dict) and frame.pop("mustSucceed", False)
    text = to_json(frame)
    if key is not None and not readable(text):
        key = None  # no ids to answer to: a warning, as for any unreadable frame
    shown = text[:300]
    sockets.sent.append(f"{namespace}: {to_json(frame)[:2000]}")
    try:
        ws.send(text)
        if key == "channelId" and frame.get("endpoint") == "streamLogs":  # endless otherwise
            ws.send(json.dumps({"type": "channelSend", "channelId": frame[key],
                                "message": {"type": "stop"}}))
        return read_reply(ws, frame, key, shown, must_succeed)
    except ConnectionClosed as exc:
        sockets.open.pop(namespace, None)
        return [f"{shown}: the server closed the socket ({exc})"]
    except TimeoutError:
        sockets.open.pop(namespace, None)
        ws.close()
        return [f"{shown}: no answer within 60 s; sent before it: {sockets.sent[-3:-1]}"]


def readable(text: str) -> bool:
    """Whether the server can read the frame's ids: nesting within Python's recursion limit."""
    try:
        json.loads(text, parse_int=lambda digits: None)
    except (ValueError, RecursionError):
        return False
    return True


SEEN: Counter[str] = Counter()  # what the frames got, for the report


def read_reply(ws: ClientConnection, frame: Any, key: str | None, shown: str,
               must_succeed: bool = False) -> list[str]:
    if key is None:  # a bare frame: a warning, an ack, or nothing at all
        ws.send(json.dumps({"type": "keepAlive"}))
        while (reply := json.loads(ws.recv(timeout=60)))["type"] != "keepAliveAck":
            pass
        return []
    failures = []
    while True:
        reply = json.loads(ws.recv(timeout=60))
        if reply.get(key) != frame[key]:
            continue
        SEEN[reply["type"] if reply["type"] != "channelSend" else reply["message"].get("type")] += 1
        if reply["type"] in ("rpcError", "channelError"):
            title = str(reply["error"].get("title"))
            if title.startswith("Internal server error") or must_succeed:
                failures.append(f"{shown}: {title}")
            return failures
        if reply["type"] == "channelSend":
            message = reply["message"]
            if message.get("type") == "error":
                failures.append(f"{shown}: {json.dumps(message)[:300]}")
            if message.get("type") == "success" and frame["endpoint"] == "loadModel":
                unload = {"type": "rpcCall", "endpoint": "unloadModel", "callId": 0,
                          "parameter": {"identifier": message["info"]["identifier"]}}
                ws.send(json.dumps(unload))
            continue
        if reply["type"] in ("rpcResult", "channelClose"):
            return failures


@pytest.fixture(scope="module")
def server(real_server: ProcessServer) -> Iterator[ProcessServer]:
    r = httpx.post(real_server.base_url + "/lmscli/models/load", json={"model": MODEL},
                   timeout=120)
    assert r.status_code == 200
    yield real_server
    assert_alive(real_server)


@pytest.mark.timeout(BUDGET_S + 200)
def test_generated_frames_never_get_an_internal_error(server: ProcessServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    sockets = Sockets(server)
    failures: list[str] = []
    started = time.monotonic()
    count = 0
    slowest: list[tuple[float, str]] = []

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              phases=[Phase.explicit, Phase.generate],  # no shrinking against a live server
              suppress_health_check=list(HealthCheck))
    @given(case=FRAMES)
    def fuzz(case: tuple[str, Any]) -> None:
        nonlocal count
        if time.monotonic() - started > BUDGET_S:
            return
        began = time.monotonic()
        failures.extend(exchange(sockets, *case))
        slowest.append((time.monotonic() - began, sockets.sent[-1][:200]))
        count += 1
        if count % 25 == 0:
            assert_alive(server)

    try:
        fuzz()
    finally:
        sockets.close()
    assert_alive(server)
    loaded = httpx.get(server.base_url + "/lmscli/models/loaded").json()
    with capsys.disabled():
        print(f"\nsdk fuzz: {count} frames in {time.monotonic() - started:.0f}s, "
              f"{len(loaded)} models loaded after; replies {dict(SEEN.most_common())}; "
              f"slowest {max(slowest, default=None)}")
    assert not failures, "\n".join(failures[:20])
    assert count >= min(EXAMPLES * 0.9, 30)  # a loaded machine gets through fewer
    assert all(e["status"] == "idle" for e in loaded)


def test_a_flood_of_predictions_never_overfills_the_queue(
        tmp_path_factory: pytest.TempPathFactory, default_model_file: Path) -> None:
    """A hundred predictions sent on one websocket faster than the engine looks at them: at most
    ``--max-queue`` ever wait (once 67 waited with 64), the rest are refused, and every
    channel ends."""
    home = tmp_path_factory.mktemp("flood-home")
    link_default_model(home, default_model_file)
    server = ProcessServer(home, None, "--parallel", "2", "--max-queue", "4")
    try:
        server.load_default(1024)
        most, stop = 0, threading.Event()

        def watch() -> None:
            nonlocal most
            while not stop.is_set():
                loaded = httpx.get(server.base_url + "/lmscli/models/loaded").json()
                most = max([most, *(e["queued"] for e in loaded)])

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        ends: Counter[str] = Counter()
        with connect(f"ws://127.0.0.1:{server.port}/llm") as ws:
            ws.send(json.dumps(AUTH))
            assert json.loads(ws.recv(timeout=10)) == {"success": True}
            for channel_id in range(1, 101):
                ws.send(flood_frame(channel_id))
            while sum(ends.values()) < 100:
                reply = json.loads(ws.recv(timeout=120))
                if reply.get("type") in ("channelClose", "channelError"):
                    ends[reply["type"]] += 1
        stop.set()
        watcher.join(timeout=10)
        assert most <= 4, most
        assert ends["channelError"] > 0 and ends["channelClose"] >= 6
    finally:
        server.stop()


def flood_frame(channel_id: int) -> str:
    return json.dumps({"type": "channelCreate", "endpoint": "predict", "channelId": channel_id,
                       "creationParameter": {
                           "modelSpecifier": {"type": "query", "query": {"identifier": MODEL}},
                           "history": {"messages": [{"role": "user", "content": [
                               {"type": "text", "text": f"Count to {channel_id}."}]}]},
                           "predictionConfigStack": {"layers": [SHORT]}}})
