"""The same prompt over the three chat APIs: /v1/chat/completions, /v1/responses, /v1/messages.

Each run streams one greedy answer per API with its official SDK (openai, anthropic), in an
order that rotates from run to run so that machine noise hits all three alike. Prompts differ
per run and per API by a tag of the same length, so that no API finds another's prompt in
the KV cache. Prints the medians of time to first token and decode tokens/s per API, and the
medians of the per-run ratios to chat completions (target: within 5%):

    .venv/bin/python bench/apis.py [--runs 7] [--max-tokens 128]

Needs the default model (``lms get smollm2-135m-instruct``) or ``--model PATH``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anthropic
import openai
from common import Timing, header, load, openai_chat, parse_args, start_server, stop, timings

PROMPT = "Run {tag}: write a long, detailed story about a lighthouse keeper and a storm."
APIS = ("chat", "responses", "messages")
Runner = Callable[[str, int], Timing]  # (prompt, max tokens) -> (ttft, tok/s)


def chat_runner(client: openai.OpenAI, model: str) -> Runner:
    return lambda prompt, max_tokens: openai_chat(client, model, prompt, max_tokens)


def responses_runner(client: openai.OpenAI, model: str) -> Runner:
    def run(prompt: str, max_tokens: int) -> Timing:
        started, times, tokens = time.perf_counter(), [], 0
        for event in client.responses.create(model=model, input=prompt, temperature=0,
                                             max_output_tokens=max_tokens, stream=True):
            if event.type == "response.output_text.delta":
                times.append(time.perf_counter())
            elif event.type in ("response.completed", "response.incomplete"):
                tokens = event.response.usage.output_tokens
        return timings(times, started, tokens)
    return run


def messages_runner(client: anthropic.Anthropic, model: str) -> Runner:
    def run(prompt: str, max_tokens: int) -> Timing:
        started, times, tokens = time.perf_counter(), [], 0
        for event in client.messages.create(
                model=model, max_tokens=max_tokens, stream=True,
                messages=[{"role": "user", "content": prompt}],
                extra_body={"temperature": 0}):  # anthropic 2.x has no temperature argument
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                times.append(time.perf_counter())
            elif event.type == "message_delta":
                tokens = event.usage.output_tokens
        return timings(times, started, tokens)
    return run


def measure(runners: dict[str, Runner], runs: int, max_tokens: int
            ) -> dict[str, list[Timing]]:
    for name, run in runners.items():  # warm-up: the first request of each path
        run(PROMPT.format(tag=f"w-{name[0]}"), 8)
    out: dict[str, list[Timing]] = {name: [] for name in runners}
    for i in range(runs):
        order = APIS[i % 3:] + APIS[:i % 3]
        for name in order:
            out[name].append(runners[name](PROMPT.format(tag=f"{i:02d}-{name[0]}"), max_tokens))
    return out


def main() -> None:
    args = parse_args(port=18235)
    with tempfile.TemporaryDirectory() as tmp:
        server = start_server(args.model, Path(tmp), args.port)
        try:
            base = f"http://127.0.0.1:{args.port}"
            key = load(base, args.model, args.ctx)
            oai = openai.OpenAI(base_url=base + "/v1", api_key="bench", max_retries=0)
            claude = anthropic.Anthropic(base_url=base, api_key="bench", max_retries=0)
            results = measure({"chat": chat_runner(oai, key),
                               "responses": responses_runner(oai, key),
                               "messages": messages_runner(claude, key)},
                              args.runs, args.max_tokens)
        finally:
            stop(server)
    print(header(args))
    report(results)


def report(results: dict[str, list[Timing]]) -> None:
    med = statistics.median
    chat = results["chat"]
    print(f"{'API':<22} {'TTFT ms':>9} {'tok/s':>8} {'TTFT/chat':>10} {'tok/s/chat':>11}")
    for name, path in zip(APIS, ("/v1/chat/completions", "/v1/responses", "/v1/messages"),
                          strict=True):
        rows = results[name]
        ttft_ratio = med(t / c for (t, _), (c, _) in zip(rows, chat, strict=True))
        tps_ratio = med(r / c for (_, r), (_, c) in zip(rows, chat, strict=True))
        print(f"{path:<22} {med(t for t, _ in rows) * 1000:9.1f} "
              f"{med(r for _, r in rows):8.1f} {ttft_ratio:10.3f} {tps_ratio:11.3f}")
    print("ratios: medians of per-run ratios to chat completions (target: within 0.95-1.05)")


if __name__ == "__main__":
    main()
