"""The rules behind `lms link` that need no server: what a name and a URL may be, how links
are kept on disk, which model a name reaches, which replica goes first, and how an upstream's
chunks become text, tool calls and stats."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import httpx
import pytest

from lmscli import linkstore
from lmscli.linkstore import LinkConfig, LinkConfigError
from lmscli.server.errors import APIError
from lmscli.server.links.registry import Link, Links, UpstreamModel
from lmscli.server.links.upstream import DONE, SseDecoder, UpstreamReply


@pytest.mark.parametrize(("given", "kept"), [
    ("http://gpu-box:8000", "http://gpu-box:8000/v1"),
    ("http://gpu-box:8000/", "http://gpu-box:8000/v1"),
    ("  http://GPU-Box:8000/v1/ ", "http://gpu-box:8000/v1"),
    ("HTTPS://gpu.example.com/openai/v1", "https://gpu.example.com/openai/v1"),
    ("http://[::1]:8000", "http://[::1]:8000/v1"),
    ("http://10.0.0.2:11434/v1", "http://10.0.0.2:11434/v1"),
])
def test_urls_are_normalised_to_the_openai_base(given: str, kept: str) -> None:
    assert linkstore.normalise_url(given) == kept


@pytest.mark.parametrize(("given", "says"), [
    ("gpu-box:8000", "it must start with http:// or https://"),
    ("ftp://gpu-box", "it must start with http:// or https://"),
    ("http://", "it must start with http:// or https://"),
    ("http://gpu-box:99999", "the port must be a number from 1 to 65535"),
    ("http://gpu-box:8000/v1?x=1", "must not have a query or a fragment"),
    ("http://me:secret@gpu-box:8000", "pass the key with --api-key"),
    ("", "give the engine's address"),
])
def test_bad_urls_say_why(given: str, says: str) -> None:
    with pytest.raises(LinkConfigError) as caught:
        linkstore.normalise_url(given)
    assert says in str(caught.value) and "\n" not in str(caught.value)
    assert "secret" not in str(caught.value)


@pytest.mark.parametrize("name", ["gpu1", "vllm.cluster-a", "A_b", "x" * 64])
def test_good_names(name: str) -> None:
    assert linkstore.check_name(name) == name


@pytest.mark.parametrize("name", ["", "a/b", "-gpu", "gpu box", "x" * 65, "gpü"])
def test_bad_names(name: str) -> None:
    with pytest.raises(LinkConfigError, match="Invalid link name"):
        linkstore.check_name(name)


def test_the_file_is_private_and_survives_a_bad_entry(tmp_path: Path) -> None:
    path = tmp_path / "links.json"
    path.write_text("{}")
    os.chmod(path, 0o644)  # a file that exists already gets tightened too
    links = [LinkConfig("gpu", "http://gpu:8000/v1", "k-1"), LinkConfig("peer", "http://p/v1")]
    linkstore.save(links, path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert linkstore.load(path) == links
    data = json.loads(path.read_text())
    data["links"].insert(0, {"name": "bad/name", "url": "http://x"})
    data["links"].append({"url": "http://no-name"})
    path.write_text(json.dumps(data))
    assert linkstore.load(path) == links
    path.write_text("not json")
    assert linkstore.load(path) == []
    assert LinkConfig("gpu", "http://gpu:8000/v1", "k-1").public() == {
        "name": "gpu", "url": "http://gpu:8000/v1", "hasApiKey": True}


# -- which model a name reaches ---------------------------------------------------------------

def registry(*links: tuple[str, list[str]], local: tuple[str, ...] = (),
             loaded: tuple[str, ...] = ()) -> Links:
    made = Links([LinkConfig(name, f"http://{name}/v1") for name, _ in links],
                 httpx.AsyncClient(), is_loaded=lambda n: n in loaded,
                 is_downloaded=lambda n: n in local,
                 local_names=lambda: {n.lower() for n in (*local, *loaded)},
                 save=lambda configs: None)
    for name, models in links:
        made.links[name].models = [UpstreamModel(m) for m in models]
        made.links[name].listed = made.links[name].reachable = True
    return made


def test_names_reach_links_replicas_or_local_models() -> None:
    reg = registry(("a", ["m", "org/big"]), ("b", ["m"]), ("c", []), local=("local-m",),
                   loaded=("a/m",))
    target = reg.resolve("m")
    assert target is not None and [link.name for link in target.links] == ["a", "b"]
    assert target.model == "m" and target.identifier == "m"
    pinned = reg.resolve("b/m")
    assert pinned is not None and [link.name for link in pinned.links] == ["b"]
    big = reg.resolve("a/org/big")
    assert big is not None and big.model == "org/big"
    assert reg.resolve("org/big") is not None  # an id with a slash needs no prefix
    assert reg.resolve("local-m") is None and reg.resolve("unknown") is None
    assert reg.resolve("a/m") is None  # a loaded identifier always wins
    with pytest.raises(APIError) as caught:
        reg.resolve("c/m")
    assert caught.value.status == 404 and 'The link "c" does not offer a model "m"' in \
        caught.value.message


def test_a_local_download_keeps_its_bare_key() -> None:
    reg = registry(("a", ["m"]), local=("m",))
    assert reg.resolve("m") is None
    assert [m.identifier for m in reg.linked_models()] == ["a/m"]
    assert reg.linked_models()[0].aliases() == ["a/m"]


def test_a_link_never_listed_is_tried_as_named() -> None:
    reg = registry(("a", []))
    reg.links["a"].listed = False
    target = reg.resolve("a/anything")
    assert target is not None and target.model == "anything"


def test_replica_order_up_then_fewest_in_flight_then_least_recent() -> None:
    a, b, c = (Link(LinkConfig(n, f"http://{n}/v1")) for n in "abc")
    a.in_flight, b.in_flight, c.in_flight = 2, 1, 1
    b.last_used, c.last_used = 10.0, 5.0
    assert [link.name for link in Links.ordered([a, b, c])] == ["c", "b", "a"]
    c.down_until = time.monotonic() + 60
    assert [link.name for link in Links.ordered([a, b, c])] == ["b", "a", "c"]


# -- reading an upstream's answer -------------------------------------------------------------

def test_sse_is_decoded_however_the_bytes_are_split() -> None:
    raw = (b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n: ping\n\n'
           b'data: {"choices": [{"delta": {"content": "lo"}}]}\r\n\r\ndata: [DONE]\n\n')
    decoder = SseDecoder()
    events = [e for i in range(len(raw)) for e in decoder.feed(raw[i:i + 1])]
    assert events[-1] == DONE
    assert [e["choices"][0]["delta"]["content"] for e in events[:-1]] == ["Hel", "lo"]


def chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_tool_calls_whether_named_once_or_every_chunk() -> None:
    repeated = UpstreamReply()  # llama-cpp-python repeats the id and name in every chunk
    for args in ('{"ci', 'ty": ', '"Paris"}'):
        repeated.feed_chunk(chunk({"tool_calls": [{
            "index": 0, "id": "call_1", "type": "function",
            "function": {"name": "weather", "arguments": args}}]}))
    once = UpstreamReply()  # vLLM names it in the first chunk only
    _, changes = once.feed_chunk(chunk({"tool_calls": [
        {"index": 0, "id": "c0", "function": {"name": "weather", "arguments": ""}}]}))
    changes += once.feed_chunk(chunk({"tool_calls": [
        {"index": 0, "function": {"arguments": '{"city": "Paris"}'}}]}))[1]
    for done in (repeated, once):
        (call,) = done.calls.values()
        assert call.name == "weather" and call.parsed_arguments() == {"city": "Paris"}
        assert done.stop_reason() == "toolCalls"
    assert [kind for kind, _, _ in changes] == ["start", "name", "args"]


def test_stats_come_from_usage_or_from_counted_chunks() -> None:
    c = UpstreamReply()
    for word in ("Hello", " there"):
        c.feed_chunk(chunk({"content": word}))
    c.feed_chunk(chunk({}, "length"))
    c.feed_chunk({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2,
                                           "prompt_tokens_details": {"cached_tokens": 3}}})
    stats = c.stats()
    assert c.text == "Hello there" and stats["stopReason"] == "maxPredictedTokensReached"
    assert (stats["promptTokensCount"], stats["predictedTokensCount"],
            stats["totalTokensCount"], stats["cachedPromptTokensCount"]) == (7, 2, 9, 3)
    counted = UpstreamReply()
    for word in ("a", "b", "c"):
        counted.feed_chunk(chunk({"content": word}))
    assert counted.stats(stopped=True) | {"totalTimeSec": 0, "timeToFirstTokenSec": 0,
                                           "tokensPerSecond": 0} == {
        "stopReason": "userStopped", "predictedTokensCount": 3, "totalTimeSec": 0,
        "timeToFirstTokenSec": 0, "tokensPerSecond": 0}
