"""Linked engines: what going through an lmscli server costs, and how replicas share and fail.

Starts llama-cpp-python's own OpenAI server (``llama_cpp.server``) on the default model, an
lmscli server with its own home and no models, and links the one to the other. Then:

1. **Overhead**: the same streamed chat (greedy, the same prompt) sent straight to the engine
   and through lmscli, alternating run by run; medians of the time to first token and of the
   decode tokens/s of each path, and their difference / ratio.
2. **Split**: a second engine on the same model and key makes two replicas; N whole-answer
   requests (C at a time) go through lmscli, and each link's share is counted.
3. **Failover**: N requests again, and one replica is killed (SIGKILL) once a quarter of them
   have finished: how many fail, in flight at the kill or after it. Run for whole answers and
   for streams (a stream whose bytes already reached the client cannot move elsewhere).

    .venv/bin/python bench/links.py [--runs 9] [--max-tokens 128] [--requests 200]
                                    [--concurrency 4] [--json]

On a 2-core machine both replicas share the same cores, so throughput gains are not measured.
Progress goes to stderr, the results (or JSON) to stdout. Everything started is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MODEL = "smollm2-135m-instruct"
MODEL_CACHE = Path(os.environ.get("LMSCLI_TEST_MODELS",
                                  Path.home() / ".cache/lmscli-test/models"))
DEFAULT_MODEL_FILE = (MODEL_CACHE / "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF"
                      / "SmolLM2-135M-Instruct.Q4_1.gguf")
PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
SHORT = "Request {i}: name a colour."


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer")


# -- the servers ------------------------------------------------------------------------------

@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    base_url: str

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


def start_engine(model: Path, logs: Path, n: int) -> Server:
    port = free_port()
    # --interrupt_requests False: otherwise it ends a running stream whenever another
    # request arrives, lmscli's periodic model listing included
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--model_alias", MODEL,
         "--port", str(port), "--n_ctx", "4096", "--interrupt_requests", "False"],
        stdout=open(logs / f"engine{n}.log", "wb"), stderr=subprocess.STDOUT)  # noqa: SIM115
    server = Server(proc, f"http://127.0.0.1:{port}")
    wait_for(server.base_url + "/v1/models")
    # its first streamed answer stalls with today's sse-starlette; a whole one first avoids it
    httpx.post(server.base_url + "/v1/chat/completions", timeout=120, json={
        "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1})
    return server


def start_front(home: Path) -> Server:
    port = free_port()
    env = os.environ | {"LMSCLI_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "lmscli.server", "--port", str(port)],
                            env=env, stdout=open(home / "front.log", "wb"),  # noqa: SIM115
                            stderr=subprocess.STDOUT)
    server = Server(proc, f"http://127.0.0.1:{port}")
    wait_for(server.base_url + "/lmstudio-greeting")
    return server


def link(front: Server, name: str, engine: Server) -> None:
    r = httpx.post(front.base_url + "/lmscli/links", timeout=30,
                   json={"name": name, "url": engine.base_url})
    r.raise_for_status()
    assert r.json()["link"]["reachable"], r.json()


def served(front: Server) -> dict[str, int]:
    links = httpx.get(front.base_url + "/lmscli/links", timeout=10).json()["links"]
    return {item["name"]: item["served"] for item in links}


# -- 1. overhead ------------------------------------------------------------------------------

@dataclass
class Run:
    ttft: float
    tps: float
    tokens: int


async def stream_once(http: httpx.AsyncClient, base_url: str, max_tokens: int) -> Run:
    body = {"model": MODEL, "stream": True, "temperature": 0, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": PROMPT}]}
    times: list[float] = []
    started = time.perf_counter()
    async with http.stream("POST", base_url + "/v1/chat/completions", json=body) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choices = json.loads(line[6:]).get("choices") or [{}]
            if (choices[0].get("delta") or {}).get("content"):
                times.append(time.perf_counter())
    span = times[-1] - times[0]
    return Run(times[0] - started, (len(times) - 1) / span if span > 0 else float("nan"),
               len(times))


async def overhead(engine: Server, front: Server, runs: int, max_tokens: int
                   ) -> dict[str, Any]:
    direct: list[Run] = []
    linked: list[Run] = []
    async with httpx.AsyncClient(timeout=300) as http:
        await stream_once(http, engine.base_url, 8)  # warm both paths and the prompt cache
        await stream_once(http, front.base_url, 8)
        for i in range(runs):
            # alternate the order, so that drift on a noisy machine hits both alike
            first, second = ((engine, direct), (front, linked))[:: 1 if i % 2 else -1]
            for server, sink in (first, second):
                sink.append(await stream_once(http, server.base_url, max_tokens))
            log(f"  run {i + 1}/{runs}: direct ttft {direct[-1].ttft * 1000:.1f} ms "
                f"{direct[-1].tps:.1f} tok/s, linked ttft {linked[-1].ttft * 1000:.1f} ms "
                f"{linked[-1].tps:.1f} tok/s")
    med = statistics.median
    ratios = [b.tps / a.tps for a, b in zip(direct, linked, strict=True)]
    return {
        "runs": runs, "max_tokens": max_tokens,
        "tokens": [r.tokens for r in direct[:1] + linked[:1]],
        "direct_ttft_ms": med(r.ttft for r in direct) * 1000,
        "linked_ttft_ms": med(r.ttft for r in linked) * 1000,
        "ttft_added_ms": (med(r.ttft for r in linked) - med(r.ttft for r in direct)) * 1000,
        "direct_ttft_min_ms": min(r.ttft for r in direct) * 1000,
        "linked_ttft_min_ms": min(r.ttft for r in linked) * 1000,
        "direct_tps": med(r.tps for r in direct), "linked_tps": med(r.tps for r in linked),
        "tps_ratio_median_of_pairs": med(ratios),
    }


# -- 2 and 3. replicas ------------------------------------------------------------------------

@dataclass
class Outcome:
    started: float
    ended: float = 0.0
    ok: bool = False
    error: str = ""


@dataclass
class Load:
    requests: int
    concurrency: int
    stream: bool
    outcomes: list[Outcome] = field(default_factory=list)

    async def one(self, http: httpx.AsyncClient, base_url: str, i: int) -> None:
        outcome = Outcome(time.perf_counter())
        self.outcomes.append(outcome)
        body = {"model": MODEL, "temperature": 0, "max_tokens": 8, "stream": self.stream,
                "messages": [{"role": "user", "content": SHORT.format(i=i)}]}
        try:
            r = await http.post(base_url + "/v1/chat/completions", json=body)
            failed = r.status_code != 200 or b'"error"' in r.content
            outcome.ok, outcome.error = not failed, r.text[:200] if failed else ""
        except httpx.HTTPError as exc:
            outcome.error = f"{type(exc).__name__}: {exc}"
        outcome.ended = time.perf_counter()

    async def run(self, base_url: str) -> None:
        queue = iter(range(self.requests))
        async with httpx.AsyncClient(timeout=300) as http:
            async def worker() -> None:
                for i in queue:
                    await self.one(http, base_url, i)

            await asyncio.gather(*(worker() for _ in range(self.concurrency)))

    def finished(self) -> int:
        return sum(1 for o in self.outcomes if o.ended)


async def split(front: Server, requests: int, concurrency: int) -> dict[str, Any]:
    before = served(front)
    load = Load(requests, concurrency, stream=False)
    started = time.perf_counter()
    await load.run(front.base_url)
    after = served(front)
    shares = {name: after[name] - before.get(name, 0) for name in after}
    return {"requests": requests, "concurrency": concurrency, "shares": shares,
            "failed": sum(not o.ok for o in load.outcomes),
            "seconds": time.perf_counter() - started}


async def failover(front: Server, victim: Server, requests: int, concurrency: int,
                   stream: bool) -> dict[str, Any]:
    load = Load(requests, concurrency, stream)
    task = asyncio.create_task(load.run(front.base_url))
    while load.finished() < requests // 4:
        await asyncio.sleep(0.01)
    killed_at = time.perf_counter()
    victim.kill()
    await task
    failed = [o for o in load.outcomes if not o.ok]
    return {"stream": stream, "requests": requests, "failed": len(failed),
            "failed_started_after_kill": sum(o.started > killed_at for o in failed),
            "last_failure_after_kill_s": max((o.ended - killed_at for o in failed),
                                             default=None),
            "errors": sorted({o.error[:120] for o in failed})[:3]}


# -- main -------------------------------------------------------------------------------------

@contextlib.contextmanager
def servers() -> Iterator[list[Server]]:
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in started:
            server.kill()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"cpus": os.cpu_count(), "load_average": os.getloadavg()}
    with servers() as running, tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        log("starting the engine and the lmscli server...")
        engine = start_engine(args.model, logs, 1)
        running.append(engine)
        front = start_front(logs)
        running.append(front)
        link(front, "one", engine)
        log(f"overhead: {args.runs} runs of {args.max_tokens} tokens each way")
        out["overhead"] = await overhead(engine, front, args.runs, args.max_tokens)
        second = start_engine(args.model, logs, 2)
        running.append(second)
        link(front, "two", second)
        log(f"split: {args.requests} requests, {args.concurrency} at a time, then one at a time")
        out["split"] = await split(front, args.requests, args.concurrency)
        out["split_sequential"] = await split(front, args.requests // 2, 1)
        out["failover"] = []
        for stream in (False, True):
            if stream:  # a fresh second replica, on a new port: link it again
                second = start_engine(args.model, logs, 3)
                running.append(second)
                httpx.post(front.base_url + "/lmscli/links/remove", json={"name": "two"})
                link(front, "two", second)
            log(f"failover ({'streams' if stream else 'whole answers'}): kill one replica "
                "a quarter of the way in")
            out["failover"].append(await failover(front, second, args.requests,
                                                  args.concurrency, stream))
    out["load_average_after"] = os.getloadavg()
    return out


def report(result: dict[str, Any]) -> None:
    o = result["overhead"]
    print(f"cpus {result['cpus']}, load average before {result['load_average'][0]:.1f}, "
          f"after {result['load_average_after'][0]:.1f}")
    print(f"overhead ({o['runs']} runs, {o['max_tokens']} max tokens, medians):")
    print(f"  ttft   direct {o['direct_ttft_ms']:.1f} ms   linked {o['linked_ttft_ms']:.1f} ms"
          f"   added {o['ttft_added_ms']:+.1f} ms   (target <= +5 ms)")
    print(f"         fastest runs: direct {o['direct_ttft_min_ms']:.1f} ms   linked "
          f"{o['linked_ttft_min_ms']:.1f} ms")
    print(f"  tok/s  direct {o['direct_tps']:.1f}   linked {o['linked_tps']:.1f}   "
          f"ratio {o['tps_ratio_median_of_pairs']:.3f}   (target >= 0.97)")
    for s in (result["split"], result["split_sequential"]):
        print(f"split of {s['requests']} requests ({s['concurrency']} at a time): "
              f"{s['shares']}, {s['failed']} failed, {s['seconds']:.1f} s")
    for f in result["failover"]:
        kind = "streams" if f["stream"] else "whole answers"
        print(f"failover, {kind}: {f['failed']} of {f['requests']} failed "
              f"({f['failed_started_after_kill']} started after the kill)"
              + (f"; {f['errors']}" if f["errors"] else ""))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL_FILE)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if not args.model.exists():
        log(f"No model at {args.model}: run the real tests once, or pass --model.")
        return 1
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
