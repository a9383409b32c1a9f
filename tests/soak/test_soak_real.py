"""The soak test (issue 22): mixed traffic against one real server for a long while, and what
a user would notice: a lost, failed or truncated reply, or memory that keeps growing.

Not in the default run (it takes 30 minutes): ``.venv/bin/python -m pytest -m soak -s
tests/soak`` (``LMSCLI_SOAK_S`` sets the length; ``LMSCLI_SOAK_WORKERS`` the clients at once).
The default model with 4 slots gets chats, streams, streams cancelled after a few chunks,
embeddings, Responses, Messages, Ollama chats and SDK websocket predictions, each checked
for a whole answer; the report gives requests, outcome counts, p50/p99 latency per kind and
the server's memory after the warm-up and at the end.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

import anthropic
import httpx
import lmstudio
import openai
import pytest

from tests.conftest import ProcessServer, link_default_model

pytestmark = [pytest.mark.real, pytest.mark.soak]
MODEL = "smollm2-135m-instruct"
DURATION_S = float(os.environ.get("LMSCLI_SOAK_S", "1800"))
WORKERS = int(os.environ.get("LMSCLI_SOAK_WORKERS", "6"))
WARMUP_S = min(120.0, DURATION_S / 10)
MAX_TOKENS = 32
TOPICS = ["the sea", "a city at night", "bread", "rain", "a train", "music", "the moon",
          "a garden", "winter", "a library", "coffee", "mountains"]


class Tally:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.outcomes: Counter[str] = Counter()
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.lost: list[str] = []

    def record(self, kind: str, outcome: str, seconds: float, problem: str = "") -> None:
        with self.lock:
            self.outcomes[f"{kind} {outcome}"] += 1
            self.latency[kind].append(seconds)
            if problem:
                self.lost.append(f"{kind}: {problem}"[:300])


def question(rng: random.Random) -> str:
    return f"Write two sentences about {rng.choice(TOPICS)} ({rng.randrange(10**6)})."


class Traffic:
    """One client of each API; each ``kind`` method sends one request and says what is wrong
    with its answer ("" when nothing)."""

    def __init__(self, server: ProcessServer) -> None:
        self.base = server.base_url
        self.oai = openai.OpenAI(base_url=self.base + "/v1", api_key="lm-studio",
                                 max_retries=0, timeout=300)
        self.claude = anthropic.Anthropic(base_url=self.base, api_key="lm-studio",
                                          max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=self.base, timeout=300)
        self.sdk = lmstudio.Client(f"127.0.0.1:{server.port}")

    def close(self) -> None:
        self.sdk.close()
        self.http.close()

    def chat(self, rng: random.Random) -> str:
        r = self.oai.chat.completions.create(model=MODEL, max_tokens=MAX_TOKENS, messages=[
            {"role": "user", "content": question(rng)}])
        choice = r.choices[0]
        ok = choice.finish_reason in ("stop", "length") and choice.message.content
        return "" if ok else f"finish {choice.finish_reason}, text {choice.message.content!r}"

    def stream(self, rng: random.Random) -> str:
        text, finish = "", None
        for chunk in self.oai.chat.completions.create(
                model=MODEL, max_tokens=MAX_TOKENS, stream=True,
                messages=[{"role": "user", "content": question(rng)}]):
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                finish = chunk.choices[0].finish_reason or finish
        return "" if finish in ("stop", "length") and text else f"stream ended: {finish!r}"

    def cancel(self, rng: random.Random) -> str:
        with self.oai.chat.completions.create(
                model=MODEL, max_tokens=200, stream=True,
                messages=[{"role": "user", "content": question(rng)}]) as stream:
            for n, _ in enumerate(stream):
                if n == 3:
                    break
        return ""

    def embed(self, rng: random.Random) -> str:
        texts = [question(rng) for _ in range(rng.randrange(1, 20))]
        r = self.oai.embeddings.create(model=MODEL, input=texts)
        return "" if len(r.data) == len(texts) else f"{len(r.data)} of {len(texts)} vectors"

    def responses(self, rng: random.Random) -> str:
        r = self.oai.responses.create(model=MODEL, max_output_tokens=MAX_TOKENS,
                                      input=question(rng), store=False)
        return "" if r.status in ("completed", "incomplete") and r.output_text else \
            f"status {r.status}"

    def messages(self, rng: random.Random) -> str:
        r = self.claude.messages.create(model=MODEL, max_tokens=MAX_TOKENS, messages=[
            {"role": "user", "content": question(rng)}])
        ok = r.stop_reason in ("end_turn", "max_tokens") and r.content
        return "" if ok else f"stop {r.stop_reason}"

    def ollama(self, rng: random.Random) -> str:
        lines = []
        with self.http.stream("POST", "/api/chat", json={
                "model": MODEL, "options": {"num_predict": MAX_TOKENS},
                "messages": [{"role": "user", "content": question(rng)}]}) as r:
            r.raise_for_status()
            lines = [json.loads(line) for line in r.iter_lines() if line]
        last = lines[-1] if lines else {}
        return "" if last.get("done") and last.get("eval_count") else f"last line {last}"

    def sdk_predict(self, rng: random.Random) -> str:
        result = self.sdk.llm.model(MODEL).respond(question(rng),
                                                   config={"maxTokens": MAX_TOKENS})
        stop = result.stats.stop_reason
        ok = stop in ("eosFound", "maxPredictedTokensReached") and result.content
        return "" if ok else f"stop {stop}"


KINDS: dict[str, Callable[[Traffic, random.Random], str]] = {
    "chat": Traffic.chat, "stream": Traffic.stream, "cancel": Traffic.cancel,
    "embed": Traffic.embed, "responses": Traffic.responses, "messages": Traffic.messages,
    "ollama": Traffic.ollama, "sdk": Traffic.sdk_predict}


def rss_mib(server: ProcessServer) -> float:
    with open(f"/proc/{server.proc.pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def worker(server: ProcessServer, tally: Tally, until: float, seed: int) -> None:
    rng = random.Random(seed)
    traffic = Traffic(server)
    try:
        while time.monotonic() < until:
            kind = rng.choice(list(KINDS))
            started = time.monotonic()
            try:
                problem = KINDS[kind](traffic, rng)
                outcome = "ok" if not problem else "truncated"
            except Exception as exc:  # a lost reply: the report lists each
                problem, outcome = f"{type(exc).__name__}: {exc}", "lost"
            tally.record(kind, outcome, time.monotonic() - started, problem)
    finally:
        traffic.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           default_model_file: Path) -> Iterator[ProcessServer]:
    home = tmp_path_factory.mktemp("soak-home")
    link_default_model(home, default_model_file)
    # a bounded prompt cache, so that its filling up is not read as a leak
    server = ProcessServer(home, None, "--parallel", "4", "--cache-ram", "128M")
    server.load_default(4096, "--parallel", "4")
    yield server
    server.stop()


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@pytest.mark.timeout(int(DURATION_S) + 900)
def test_mixed_traffic_loses_nothing_and_memory_stays_flat(
        server: ProcessServer, capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    until = started + DURATION_S
    tally = Tally()
    threads = [threading.Thread(target=worker, args=(server, tally, until, seed), daemon=True)
               for seed in range(WORKERS)]
    for thread in threads:
        thread.start()
    time.sleep(WARMUP_S)
    rss_start = rss_mib(server)
    curve = [rss_start]  # every minute: growth that stops is a cache filling, not a leak
    while any(thread.is_alive() for thread in threads):
        minute = time.monotonic() + 60
        while time.monotonic() < minute and any(thread.is_alive() for thread in threads):
            time.sleep(1)
        curve.append(rss_mib(server))
    for thread in threads:
        thread.join()
    time.sleep(2)  # cancelled streams end within a step
    rss_end = rss_mib(server)
    loaded = httpx.get(server.base_url + "/lmscli/models/loaded").json()
    total = sum(tally.outcomes.values())
    lines = [f"soak: {total} requests in {time.monotonic() - started:.0f} s by {WORKERS} "
             f"clients; server memory {rss_start:.0f} MiB after {WARMUP_S:.0f} s, "
             f"{rss_end:.0f} MiB at the end ({(rss_end / rss_start - 1) * 100:+.1f}%)"]
    for kind in KINDS:
        times = tally.latency.get(kind, [])
        if times:
            lines.append(f"  {kind:9} {len(times):5} requests, p50 {statistics.median(times):.2f}"
                         f" s, p99 {percentile(times, 0.99):.2f} s")
    lines.append(f"  outcomes: {dict(sorted(tally.outcomes.items()))}")
    lines.append("  memory each minute (MiB): " + " ".join(f"{m:.0f}" for m in curve))
    lines += [f"  lost: {problem}" for problem in tally.lost[:20]]
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not tally.lost, "\n".join(tally.lost[:20])
    assert all(e["status"] == "idle" and e["queued"] == 0 for e in loaded), loaded
    assert rss_end < rss_start * 1.05, lines[0]
