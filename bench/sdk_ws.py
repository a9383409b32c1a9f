"""The lmstudio SDK over lmscli's websocket vs. the OpenAI SDK over /v1: one streamed reply.

Same server, model, prompts and greedy settings; runs alternate between the two paths so that
machine noise hits both alike. Prints the medians of time to first token and of decode
tokens/s for each path, and their ratios (target: within 5%):

    .venv/bin/python bench/sdk_ws.py [--runs 7] [--max-tokens 128]

Needs the default model (``lms get smollm2-135m-instruct``) or ``--model PATH``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lmscli import catalog

PROMPT = "Run {i}: write a long, detailed story about a lighthouse keeper and a storm."


def timings(chunk_times: list[float], started: float, tokens: int) -> tuple[float, float]:
    """(time to first token in s, decode tokens/s): tokens after the first over the time from
    the first text to the last text seen by the client."""
    ttft = chunk_times[0] - started
    span = chunk_times[-1] - chunk_times[0]
    return ttft, (tokens - 1) / span if span > 0 else float("nan")


def start_server(model_file: Path, home: Path, port: int) -> subprocess.Popen:
    target = home / "models/bench/bench-GGUF" / model_file.name
    target.parent.mkdir(parents=True)
    target.symlink_to(model_file.resolve())
    env = os.environ | {"LMSCLI_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "lmscli.server", "--port", str(port),
                             "--no-sdk-port"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/lmstudio-greeting", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def run_openai(client: object, model: str, i: int, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    times = []
    tokens = 0
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model=model, messages=[{"role": "user", "content": PROMPT.format(i=i)}],
        temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return timings(times, started, tokens)


def run_lmstudio(model: object, i: int, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    times = []
    stream = model.respond_stream(  # type: ignore[attr-defined]
        PROMPT.format(i=i), config={"temperature": 0, "maxTokens": max_tokens})
    for fragment in stream:
        if fragment.content:
            times.append(time.perf_counter())
    return timings(times, started, stream.result().stats.predicted_tokens_count)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--port", type=int, default=18235)
    args = parser.parse_args()
    model_file = args.model or catalog.find_model(catalog.DEFAULT_MODEL).abs_path

    import lmstudio
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(model_file, Path(tmp), args.port)
        try:
            base = f"http://127.0.0.1:{args.port}"
            key = catalog.store.base_key(model_file.name)
            httpx.post(f"{base}/lmscli/models/load", json={"model": key,
                                                            "context_length": args.ctx},
                       timeout=120).raise_for_status()
            client = openai.OpenAI(base_url=base + "/v1", api_key="bench")
            with lmstudio.Client(f"127.0.0.1:{args.port}") as sdk:
                model = sdk.llm.model(key)
                run_openai(client, key, -1, 8)  # warm-up both
                run_lmstudio(model, -1, 8)
                a, b = [], []
                for i in range(args.runs):
                    a.append(run_openai(client, key, i, args.max_tokens))
                    b.append(run_lmstudio(model, i, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=20)
    report(a, b, model_file, args)


def report(a: list[tuple[float, float]], b: list[tuple[float, float]], model: Path,
           args: argparse.Namespace) -> None:
    med = statistics.median
    a_ttft, b_ttft = med(t for t, _ in a), med(t for t, _ in b)
    a_tps, b_tps = med(r for _, r in a), med(r for _, r in b)
    decode = [rb / ra for (_, ra), (_, rb) in zip(a, b, strict=True)]
    ttft = [tb / ta for (ta, _), (tb, _) in zip(a, b, strict=True)]
    print(f"model: {model.name}  runs: {args.runs}  max_tokens: {args.max_tokens}  "
          f"ctx: {args.ctx}  cores: {os.cpu_count()}  load: {os.getloadavg()[0]:.1f}")
    print(f"(a) OpenAI SDK, /v1 SSE          : TTFT {a_ttft * 1000:7.1f} ms   "
          f"decode {a_tps:6.1f} tok/s")
    print(f"(b) lmstudio SDK, websocket /llm : TTFT {b_ttft * 1000:7.1f} ms   "
          f"decode {b_tps:6.1f} tok/s")
    print(f"decode ratio b/a (median of per-run ratios): {med(decode):.3f}  (target >= 0.95)")
    print(f"TTFT ratio b/a (median of per-run ratios):   {med(ttft):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
