"""Server overhead: llama-cpp-python in process vs. the lmscli server via the OpenAI SDK.

Same model file, prompts, context and greedy settings; runs alternate between the two so that
machine noise hits both alike. Prints medians and the ratios measured in this one run:

    .venv/bin/python bench/server_vs_inprocess.py [--runs 7] [--max-tokens 128]

Needs the default model (``lms get smollm2-135m-instruct``) or ``--model PATH``.
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

from common import (
    PROMPT,
    Timing,
    header,
    load,
    openai_chat,
    parse_args,
    start_server,
    stop,
    timings,
)


def run_inprocess(llama: object, i: int, max_tokens: int) -> Timing:
    started = time.perf_counter()
    times = []
    stream: Iterable[dict] = llama.create_chat_completion(  # type: ignore[attr-defined]
        messages=[{"role": "user", "content": PROMPT.format(i=i)}], temperature=0,
        max_tokens=max_tokens, stream=True)
    for chunk in stream:
        if chunk["choices"][0]["delta"].get("content"):
            times.append(time.perf_counter())
    return timings(times, started, len(times))  # llama-cpp-python streams one token a chunk


def main() -> None:
    args = parse_args(port=18234)
    import llama_cpp
    import openai

    llama = llama_cpp.Llama(str(args.model), n_ctx=args.ctx, n_batch=512,
                            n_threads=os.cpu_count(), verbose=False)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.model, Path(tmp), args.port)
        try:
            base = f"http://127.0.0.1:{args.port}"
            key = load(base, args.model, args.ctx)
            client = openai.OpenAI(base_url=base + "/v1", api_key="bench")
            run_inprocess(llama, -1, 8)  # warm-up both
            openai_chat(client, key, PROMPT.format(i=-1), 8)
            a, b = [], []
            for i in range(args.runs):
                a.append(run_inprocess(llama, i, args.max_tokens))
                b.append(openai_chat(client, key, PROMPT.format(i=i), args.max_tokens))
        finally:
            stop(server)
    print(header(args))
    report(a, b)


def report(a: list[Timing], b: list[Timing]) -> None:
    med = statistics.median
    a_ttft, b_ttft = med(t for t, _ in a), med(t for t, _ in b)
    a_tps, b_tps = med(r for _, r in a), med(r for _, r in b)
    ratios = [rb / ra for (_, ra), (_, rb) in zip(a, b, strict=True)]
    print(f"(a) llama-cpp-python in process : TTFT {a_ttft * 1000:7.1f} ms   "
          f"decode {a_tps:6.1f} tok/s")
    print(f"(b) lmscli server, OpenAI SDK   : TTFT {b_ttft * 1000:7.1f} ms   "
          f"decode {b_tps:6.1f} tok/s")
    print(f"decode ratio b/a (median of per-run ratios): {med(ratios):.3f}  "
          f"(target >= 0.95)")
    print(f"added TTFT b - a (medians): {(b_ttft - a_ttft) * 1000:+.1f} ms  (target <= 15 ms)")


if __name__ == "__main__":
    main()
