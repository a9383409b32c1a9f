"""The log bus and the ``lms log stream`` text format, without a server."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import datetime
from typing import Any

import pytest

from lmscli.cli import log as log_cli
from lmscli.errors import UserInputError
from lmscli.logbus import LogBus
from lmscli.logbus import events as log_events
from lmscli.server.logs_http import STREAM_PATH, RequestLogMiddleware


def logs(messages: list[dict[str, Any]]) -> list[Any]:
    """Each message as the event's ``data`` (``n`` when published as {"n": n}) or a gap."""
    return [m["log"]["data"]["n"] if m["type"] == "log" else ("dropped", m["count"])
            for m in messages]


# -- the bus ----------------------------------------------------------------------------------

def test_overflow_drops_the_newest_and_reports_the_gap_where_it_is() -> None:
    async def main() -> None:
        bus = LogBus(buffer=5)
        sub = bus.subscribe()
        for n in range(8):  # 0-4 fit, 5-7 are dropped
            bus.publish({"n": n})
        assert logs(sub.take(max_items=2)) == [0, 1]
        bus.publish({"n": 8})  # room again: the gap is closed in front of it
        assert logs(sub.take()) == [2, 3, 4, ("dropped", 3), 8]
        assert sub.take() == []

    asyncio.run(main())


def test_a_gap_at_the_tail_is_reported_once_the_reader_caught_up() -> None:
    async def main() -> None:
        bus = LogBus(buffer=3)
        sub = bus.subscribe()
        for n in range(10):
            bus.publish({"n": n})
        assert logs(sub.take()) == [0, 1, 2, ("dropped", 7)]
        assert not sub.pending

    asyncio.run(main())


def test_every_event_is_delivered_or_counted() -> None:
    async def main() -> None:
        bus = LogBus(buffer=8)
        sub = bus.subscribe()
        seen, dropped = [], 0
        for n in range(1000):
            bus.publish({"n": n})
            assert len(sub._items) <= 8  # gap markers included
            if n % 13 == 0:
                for item in logs(sub.take(max_items=3)):
                    if isinstance(item, tuple):
                        dropped += item[1]
                    else:
                        seen.append(item)
        for item in logs(sub.take(max_items=100)):
            if isinstance(item, tuple):
                dropped += item[1]
            else:
                seen.append(item)
        assert seen == sorted(seen) and len(set(seen)) == len(seen)
        assert len(seen) + dropped == 1000 and dropped > 0

    asyncio.run(main())


def test_each_subscriber_has_its_own_buffer() -> None:
    async def main() -> None:
        bus = LogBus(buffer=2)
        slow, fast = bus.subscribe(), bus.subscribe()
        for n in range(4):
            bus.publish({"n": n})
            assert logs(fast.take()) == [n]
        assert logs(slow.take()) == [0, 1, ("dropped", 2)]
        bus.unsubscribe(slow)
        bus.publish({"n": 9})
        assert slow.take() == [] and logs(fast.take()) == [9]
        assert bus.subscriber_count == 1

    asyncio.run(main())


def test_event_shape_and_timestamp() -> None:
    async def main() -> None:
        bus = LogBus()
        sub = bus.subscribe()
        before = int(time.time() * 1000)
        bus.publish({"type": "server.log", "content": "x", "level": "info"})
        (message,) = sub.take()
        assert message["type"] == "log"
        assert set(message["log"]) == {"timestamp", "data"}
        assert before <= message["log"]["timestamp"] <= int(time.time() * 1000)

    asyncio.run(main())


def test_wait_wakes_on_publish_and_times_out_when_idle() -> None:
    async def main() -> None:
        bus = LogBus()
        sub = bus.subscribe()
        started = time.perf_counter()
        await sub.wait(0.05)
        assert 0.04 < time.perf_counter() - started < 1
        asyncio.get_running_loop().call_later(0.01, bus.publish, {"n": 1})
        started = time.perf_counter()
        await sub.wait(5)
        assert time.perf_counter() - started < 1 and logs(sub.take()) == [1]

    asyncio.run(main())


def test_publish_from_another_thread_arrives_on_the_loop() -> None:
    async def main() -> None:
        bus = LogBus()
        sub = bus.subscribe()
        worker = threading.Thread(target=bus.publish_threadsafe, args=({"n": 7},))
        worker.start()
        worker.join()
        await sub.wait(5)
        assert logs(sub.take()) == [7]

    asyncio.run(main())
    bus = LogBus()
    bus.publish_threadsafe({"n": 1})  # no loop, no reader: nothing happens, nothing raises


def test_publish_threadsafe_after_the_loop_closed_does_not_raise() -> None:
    bus = LogBus()

    async def main() -> None:
        bus.subscribe()

    asyncio.run(main())
    bus.publish_threadsafe({"n": 1})


def test_without_subscribers_nothing_is_built(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> dict[str, Any]:
        raise AssertionError("an event was built with nobody listening")

    for name in ("prediction_input", "prediction_output", "runtime_log", "server_log"):
        monkeypatch.setattr(log_events, name, boom)
    bus = LogBus()
    assert not bus.active
    bus.publish({"n": 1})

    assert log_events.PredictionLog.begin(LogBus(), "m", "a/b.gguf", "hi") is None

    class FakeEngine:
        name, version = "fake", "1.0"

    runtime = log_events.RuntimeLog(bus, FakeEngine(), logging.getLogger("test"))  # type: ignore
    runtime("info", "Loaded m", "m")


def test_client_and_server_agree_on_the_route() -> None:
    from lmscli.client import logs

    assert logs.STREAM_PATH == STREAM_PATH


def test_request_log_middleware_passes_straight_through_when_nobody_listens() -> None:
    seen: list[tuple[object, object]] = []

    async def app(scope: dict, receive: object, send: object) -> None:
        seen.append((receive, send))

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        pass

    middleware = RequestLogMiddleware(app, LogBus())  # type: ignore[arg-type]
    scope = {"type": "http", "method": "GET", "path": "/v1/models"}
    asyncio.run(middleware(scope, receive, send))
    assert seen == [(receive, send)]  # the very same callables: no wrapping, no timing


def test_request_log_middleware_names_the_model_from_a_split_body() -> None:
    async def main() -> list[dict[str, Any]]:
        bus = LogBus()
        sub = bus.subscribe()
        chunks = [b'{"messages": [{"content": "say \\"model\\": \\"no\\""}], "mo',
                  b'del": "tiny-\\u0063hat", "x": 1}']

        async def app(scope: dict, receive: Any, send: Any) -> None:
            while (await receive()).get("more_body"):
                pass
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async def receive() -> dict:
            body = chunks.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(chunks)}

        async def send(message: dict) -> None:
            pass

        scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions"}
        await RequestLogMiddleware(app, bus)(scope, receive, send)  # type: ignore[arg-type]
        return [m["log"]["data"] for m in sub.take()]

    (data,) = asyncio.run(main())
    assert data["type"] == "server.log" and data["level"] == "warn"
    content = data["content"]
    assert content.startswith("POST /v1/chat/completions 404 ")
    assert content.endswith(" model=tiny-chat")


# -- the text format --------------------------------------------------------------------------

def ms(*args: int) -> float:
    return datetime(*args).timestamp() * 1000  # type: ignore[misc]


@pytest.mark.parametrize(("when", "text"), [
    ((2024, 11, 13, 9, 35, 15), "11/13/2024, 9:35:15 AM"),
    ((2024, 1, 2, 0, 0, 5), "1/2/2024, 12:00:05 AM"),
    ((2025, 6, 30, 12, 7, 0), "6/30/2025, 12:07:00 PM"),
    ((2025, 12, 31, 23, 59, 59), "12/31/2025, 11:59:59 PM"),
])
def test_timestamps_are_en_us_locale_strings(when: tuple[int, ...], text: str) -> None:
    assert log_cli.locale_timestamp(ms(*when)) == text


INPUT = {"timestamp": ms(2024, 11, 13, 9, 35, 15), "data": {
    "type": "llm.prediction.input", "input": "<|im_start|>user\nhi<|im_end|>\n",
    "modelPath": "pub/repo-GGUF/model.gguf", "modelIdentifier": "model"}}
OUTPUT = {"timestamp": ms(2024, 11, 13, 9, 35, 16), "data": {
    "type": "llm.prediction.output", "output": "Hello [there]", "modelIdentifier": "model",
    "stats": {"stopReason": "eosFound", "tokensPerSecond": 41.5, "totalTimeSec": 2.0,
              "promptTokensCount": 9, "timeToFirstTokenSec": 1.5e-05}}}


def test_input_event_text() -> None:
    assert log_cli.format_event(INPUT, stats=True) == (
        "timestamp: 11/13/2024, 9:35:15 AM\n"
        "type: llm.prediction.input\n"
        "modelIdentifier: model\n"
        "modelPath: pub/repo-GGUF/model.gguf\n"
        "input:\n"
        "<|im_start|>user\nhi<|im_end|>\n"
        "\n\n\n")


def test_output_event_text_with_and_without_stats() -> None:
    head = ("timestamp: 11/13/2024, 9:35:16 AM\n"
            "type: llm.prediction.output\n"
            "modelIdentifier: model\n"
            "output:\n"
            "Hello [there]\n")
    assert log_cli.format_event(OUTPUT) == head + "\n\n"
    assert log_cli.format_event(OUTPUT, stats=True) == head + (
        "stopReason: eosFound\n"
        "tokensPerSecond: 41.5\n"
        "totalTimeSec: 2\n"
        "promptTokensCount: 9\n"
        "timeToFirstTokenSec: 0.000015\n"
        "\n\n")
    no_stats = {"timestamp": OUTPUT["timestamp"],
                "data": {k: v for k, v in OUTPUT["data"].items() if k != "stats"}}
    assert log_cli.format_event(no_stats, stats=True) == head + "No stats available\n\n\n"


def test_only_values_are_painted() -> None:
    text = log_cli.format_event(OUTPUT, stats=True, paint=lambda s: f"<{s}>")
    lines = text.splitlines()
    assert lines[:5] == ["timestamp: <11/13/2024, 9:35:16 AM>", "type: <llm.prediction.output>",
                         "modelIdentifier: <model>", "output:", "<Hello [there]>"]
    assert lines[5] == "stopReason: <eosFound>"


def test_server_and_runtime_lines() -> None:
    server = {"timestamp": 0, "data": {"type": "server.log", "level": "info",
                                       "content": "POST /v1/completions 200 3ms"}}
    assert log_cli.format_event(server) == "POST /v1/completions 200 3ms\n"
    runtime = {"type": "runtime.log", "level": "info", "message": "Loaded m in 0.10s",
               "engineName": "llama.cpp", "engineVersion": "0.3.36", "engineType": "llm",
               "modelIdentifier": "m", "pid": 42}
    assert log_cli.runtime_line(runtime) == \
        "[INFO] llama.cpp@0.3.36 (llm) m pid=42 Loaded m in 0.10s"
    bare = {k: v for k, v in runtime.items() if k not in ("modelIdentifier", "pid")}
    bare["level"] = "error"
    assert log_cli.format_event({"timestamp": 0, "data": bare}) == \
        "[ERROR] llama.cpp@0.3.36 (llm) Loaded m in 0.10s\n"


@pytest.mark.parametrize(("value", "text"), [
    (2.0, "2"), (0.5, "0.5"), (41.123456789, "41.123456789"), (1.5e-05, "0.000015"),
    (1e-06, "0.000001"), (1.5e-07, "1.5e-7"), (1e16, "10000000000000000"), (1e21, "1e+21"),
    (-3.25, "-3.25"), (7, "7"), (True, "true"), (None, "null"), ("eosFound", "eosFound"),
])
def test_values_print_as_javascript_does(value: object, text: str) -> None:
    assert log_cli.js_string(value) == text


# -- option checks ----------------------------------------------------------------------------

def test_option_checks() -> None:
    wanted = log_cli.wanted_types
    both = {"llm.prediction.input", "llm.prediction.output"}
    assert wanted("model", None, False) == both
    assert wanted("model", " output ", True) == {"llm.prediction.output"}
    assert wanted("model", "output,input", False) == both
    assert wanted("model", ",", False) == both
    assert wanted("server", None, False) == {"server.log"}
    assert wanted("runtime", None, False) == {"runtime.log"}
    cases = [(("server", None, True), "--stats can only be used with --source model"),
             (("runtime", "input", False), "--filter can only be used with --source model"),
             (("model", "  ", False), "--filter cannot be empty"),
             (("model", "input,bogus", False),
              "--filter values must be 'input', 'output', or 'input,output'")]
    for args, message in cases:
        with pytest.raises(UserInputError) as info:
            wanted(*args)
        assert info.value.message == message
