"""The lmstudio SDK over lmscli's websocket vs. the OpenAI SDK over /v1: one streamed reply.

Same server, model, prompts and greedy settings; runs alternate between the two paths so that
machine noise hits both alike. Prints the medians of time to first token and of decode
tokens/s for each path, and their ratios (target: within 5%):

    .venv/bin/python bench/sdk_ws.py [--runs 7] [--max-tokens 128]

Needs the default model (``lms get smollm2-135m-instruct``) or ``--model PATH``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
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


def run_lmstudio(model: object, prompt: str, max_tokens: int) -> Timing:
    started = time.perf_counter()
    times = []
    stream = model.respond_stream(  # type: ignore[attr-defined]
        prompt, config={"temperature": 0, "maxTokens": max_tokens})
    for fragment in stream:
        if fragment.content:
            times.append(time.perf_counter())
    return timings(times, started, stream.result().stats.predicted_tokens_count)


def main() -> None:
    args = parse_args(port=18235)
    import lmstudio
    import openai

    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.model, Path(tmp), args.port, "--no-sdk-port")
        try:
            base = f"http://127.0.0.1:{args.port}"
            key = load(base, args.model, args.ctx)
            client = openai.OpenAI(base_url=base + "/v1", api_key="bench")
            with lmstudio.Client(f"127.0.0.1:{args.port}") as sdk:
                model = sdk.llm.model(key)
                openai_chat(client, key, PROMPT.format(i="w-a"), 8)  # warm-up both
                run_lmstudio(model, PROMPT.format(i="w-b"), 8)
                a, b = [], []
                for i in range(args.runs):
                    # prompts of the same length that differ: neither path finds the other's
                    # prompt in the KV cache
                    a.append(openai_chat(client, key, PROMPT.format(i=f"{i:02d}-a"),
                                         args.max_tokens))
                    b.append(run_lmstudio(model, PROMPT.format(i=f"{i:02d}-b"),
                                          args.max_tokens))
        finally:
            stop(server)
    print(header(args))
    report(a, b)


def report(a: list[Timing], b: list[Timing]) -> None:
    med = statistics.median
    a_ttft, b_ttft = med(t for t, _ in a), med(t for t, _ in b)
    a_tps, b_tps = med(r for _, r in a), med(r for _, r in b)
    decode = [rb / ra for (_, ra), (_, rb) in zip(a, b, strict=True)]
    ttft = [tb / ta for (ta, _), (tb, _) in zip(a, b, strict=True)]
    print(f"(a) OpenAI SDK, /v1 SSE          : TTFT {a_ttft * 1000:7.1f} ms   "
          f"decode {a_tps:6.1f} tok/s")
    print(f"(b) lmstudio SDK, websocket /llm : TTFT {b_ttft * 1000:7.1f} ms   "
          f"decode {b_tps:6.1f} tok/s")
    print(f"decode ratio b/a (median of per-run ratios): {med(decode):.3f}  (target >= 0.95)")
    print(f"TTFT ratio b/a (median of per-run ratios):   {med(ttft):.3f}  (target <= 1.05)")


if __name__ == "__main__":
    main()
