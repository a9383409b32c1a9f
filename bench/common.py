"""What the two-path benchmarks share: the arguments, a server of their own, the OpenAI SDK's
streamed chat, and the timings taken from a stream as the client saw it."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from lmscli import catalog
from lmscli.catalog.store import base_key

PROMPT = "Run {i}: write a long, detailed story about a lighthouse keeper and a storm."
Timing = tuple[float, float]  # (time to first token in s, decode tokens/s)


def parse_args(port: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--port", type=int, default=port)
    args = parser.parse_args()
    args.model = args.model or catalog.find_model(catalog.DEFAULT_MODEL).abs_path
    return args


def timings(chunk_times: list[float], started: float, tokens: int) -> Timing:
    """Tokens after the first over the time from the first text to the last text seen."""
    ttft = chunk_times[0] - started
    span = chunk_times[-1] - chunk_times[0]
    return ttft, (tokens - 1) / span if span > 0 else float("nan")


def start_server(model_file: Path, home: Path, port: int, *extra: str) -> subprocess.Popen:
    target = home / "models/bench/bench-GGUF" / model_file.name
    target.parent.mkdir(parents=True)
    target.symlink_to(model_file.resolve())
    env = os.environ | {"LMSCLI_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "lmscli.server", "--port", str(port), *extra],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return greeted(proc, port)


def greeted(server: subprocess.Popen, port: int, wait_s: float = 20) -> subprocess.Popen:
    """The server once it answers its greeting; it is killed if it does not within wait_s."""
    for _ in range(int(wait_s * 10)):
        try:
            httpx.get(f"http://127.0.0.1:{port}/lmstudio-greeting", timeout=0.5)
            return server
        except httpx.HTTPError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit("the server did not start")


def load(base: str, model_file: Path, ctx: int) -> str:
    """Load the model on the bench server; returns its key."""
    key = base_key(model_file.name)
    httpx.post(f"{base}/lmscli/models/load", json={"model": key, "context_length": ctx},
               timeout=120).raise_for_status()
    return key


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=20)


def openai_chat(client: object, model: str, prompt: str, max_tokens: int) -> Timing:
    """One greedy streamed reply over /v1/chat/completions with the OpenAI SDK."""
    started, times, tokens = time.perf_counter(), [], 0
    for chunk in client.chat.completions.create(  # type: ignore[attr-defined]
            model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
            max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return timings(times, started, tokens)


def header(args: argparse.Namespace) -> str:
    return (f"model: {args.model.name}  runs: {args.runs}  max_tokens: {args.max_tokens}  "
            f"ctx: {args.ctx}  cores: {os.cpu_count()}  load: {os.getloadavg()[0]:.2f}")
