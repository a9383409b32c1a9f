"""Server overhead: llama-cpp-python in process vs. the lmscli server via the OpenAI SDK.

Same model file, prompts, context and greedy settings; runs alternate between the two so that
machine noise hits both alike. Prints medians and the ratios measured in this one run:

    .venv/bin/python bench/server_vs_inprocess.py [--runs 7] [--max-tokens 128]

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
from collections.abc import Iterable
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


def run_inprocess(llama: object, i: int, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    times = []
    stream: Iterable[dict] = llama.create_chat_completion(  # type: ignore[attr-defined]
        messages=[{"role": "user", "content": PROMPT.format(i=i)}], temperature=0,
        max_tokens=max_tokens, stream=True)
    for chunk in stream:
        if chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    return timings(times, started, len(times))  # llama-cpp-python streams one token a chunk


def run_server(client: object, model: str, i: int, max_tokens: int) -> tuple[float, float]:
    started = time.perf_counter()
    times = []
    stream = client.chat.completions.create(  # type: ignore[attr-defined]
        model=model, messages=[{"role": "user", "content": PROMPT.format(i=i)}],
        temperature=0, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True})
    tokens = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            times.append(time.perf_counter())
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
    return timings(times, started, tokens)


def start_server(model_file: Path, home: Path, port: int) -> subprocess.Popen:
    target = home / "models/bench/bench-GGUF" / model_file.name
    target.parent.mkdir(parents=True)
    target.symlink_to(model_file.resolve())
    env = os.environ | {"LMSCLI_HOME": str(home)}
    proc = subprocess.Popen([sys.executable, "-m", "lmscli.server", "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/lmstudio-greeting", timeout=0.5)
            return proc
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ctx", type=int, default=8192)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--port", type=int, default=18234)
    args = parser.parse_args()
    model_file = args.model or catalog.find_model(catalog.DEFAULT_MODEL).abs_path

    import llama_cpp
    import openai

    llama = llama_cpp.Llama(str(model_file), n_ctx=args.ctx, n_batch=512,
                            n_threads=os.cpu_count(), verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(model_file, Path(tmp), args.port)
        try:
            base = f"http://127.0.0.1:{args.port}"
            key = catalog.store.base_key(model_file.name)
            httpx.post(f"{base}/lmscli/models/load", json={"model": key,
                                                            "context_length": args.ctx},
                       timeout=120).raise_for_status()
            client = openai.OpenAI(base_url=base + "/v1", api_key="bench")
            run_inprocess(llama, -1, 8)  # warm-up both
            run_server(client, key, -1, 8)
            a, b = [], []
            for i in range(args.runs):
                a.append(run_inprocess(llama, i, args.max_tokens))
                b.append(run_server(client, key, i, args.max_tokens))
        finally:
            server.terminate()
            server.wait(timeout=20)
    report(a, b, model_file, args)


def report(a: list[tuple[float, float]], b: list[tuple[float, float]], model: Path,
           args: argparse.Namespace) -> None:
    med = statistics.median
    a_ttft, b_ttft = med(t for t, _ in a), med(t for t, _ in b)
    a_tps, b_tps = med(r for _, r in a), med(r for _, r in b)
    ratios = [rb / ra for (_, ra), (_, rb) in zip(a, b, strict=False)]
    print(f"model: {model.name}  runs: {args.runs}  max_tokens: {args.max_tokens}  "
          f"ctx: {args.ctx}  cores: {os.cpu_count()}")
    print(f"(a) llama-cpp-python in process : TTFT {a_ttft * 1000:7.1f} ms   "
          f"decode {a_tps:6.1f} tok/s")
    print(f"(b) lmscli server, OpenAI SDK   : TTFT {b_ttft * 1000:7.1f} ms   "
          f"decode {b_tps:6.1f} tok/s")
    print(f"decode ratio b/a (median of per-run ratios): {med(ratios):.3f}  "
          f"(target >= 0.95)")
    print(f"added TTFT b - a (medians): {(b_ttft - a_ttft) * 1000:+.1f} ms  (target <= 15 ms)")


if __name__ == "__main__":
    main()
