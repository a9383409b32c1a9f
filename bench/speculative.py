"""Speculative decoding: lmscli with and without drafting from the context, against llama.cpp's
own llama-server without drafting and with each of its n-gram types; same GGUF and threads,
greedy, no repeat penalty (llama-server's default; lmscli's is 1.1).

Three workloads, each a streamed ``/v1/chat/completions`` request:

- rewrite: a ~800-token Python file, asked back with one identifier renamed;
- summary: a text to summarise, quoting its sentences;
- prose: a story, with nothing in the prompt to copy (the never-slower guard).

For each: decode tokens/s (median over ``--runs``, tokens after the first over the time from
the first to the last text), drafted and accepted tokens, and whether lmscli's answer with
drafting is the one without. ``--streams 4`` sends four at once and reports the aggregate.

    .venv/bin/python bench/speculative.py [--runs 3] [--streams 1] [--types ngram-simple,...]

llama-server comes from ``bash bench/build_llama_server.sh``. Progress goes to stderr, the
table to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from parallel import LLAMA_SERVER, default_model, log, spawn, stop, wait_ready

WORKLOADS = ("rewrite", "summary", "prose")
LLAMA_TYPES = ("ngram-simple", "ngram-mod", "ngram-map-k")


def code_file() -> str:
    """A Python module of ~800 tokens that uses ``items`` throughout."""
    parts = []
    for i, (name, op) in enumerate([("total", "+"), ("largest", "max"), ("smallest", "min"),
                                    ("average", "/"), ("count_over", ">"), ("names", "str"),
                                    ("discounted", "*"), ("grouped", "dict")]):
        parts.append(f'''def {name}_of_items(items, limit={i + 1}):
    """Return the {name.replace("_", " ")} of the items, looking at most at limit of them."""
    result = []
    for index, item in enumerate(items):
        if index >= limit * 10:
            break
        value = item.price if hasattr(item, "price") else item
        result.append(value)  # {op}
    return result
''')
    return "\n\n".join(parts)


def prompts() -> dict[str, str]:
    story = ("The lighthouse keeper climbed the stairs every evening at six. She lit the lamp, "
             "wound the clock and wrote the weather in her book. One night the storm broke the "
             "window, and the lamp went out. She carried a lantern to the top and held it "
             "there until dawn, when the fishing boats came home safely. ") * 4
    return {
        "rewrite": "Rewrite this Python code with the name items changed to products "
                   f"everywhere. Reply with the code only.\n\n{code_file()}",
        "summary": f"Summarise this text, quoting its sentences word for word:\n\n{story}",
        "prose": "Write a long story about a fox who learns to sail across a cold sea.",
    }


@dataclass
class Result:
    tokens_per_s: float
    tokens: int
    drafted: int | None
    accepted: int | None
    text: str


def ask(base: str, model: str, prompt: str, max_tokens: int) -> Result:
    """One greedy streamed reply; draft counts from lmscli's usage or llama-server's timings."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "repeat_penalty": 1.0, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    times, text, tokens = [], [], 0
    drafted = accepted = None
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=600) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                times.append(time.perf_counter())
                text.append(chunk["choices"][0]["delta"]["content"])
            if usage := chunk.get("usage"):
                tokens = usage["completion_tokens"]
                if details := usage.get("completion_tokens_details"):
                    accepted = details.get("accepted_prediction_tokens")
                    rejected = details.get("rejected_prediction_tokens")
                    if accepted is not None and rejected is not None:
                        drafted = accepted + rejected
            if (timings := chunk.get("timings")) and "draft_n" in timings:
                drafted, accepted = timings["draft_n"], timings["draft_n_accepted"]
    span = times[-1] - times[0] if len(times) > 1 else 0.0
    rate = (tokens - 1) / span if span > 0 else float("nan")
    return Result(rate, tokens, drafted, accepted, "".join(text))


def ask_together(base: str, model: str, prompt: str, max_tokens: int, streams: int) -> Result:
    """``streams`` copies at once; the aggregate rate is all tokens over the whole span."""
    if streams == 1:
        return ask(base, model, prompt, max_tokens)
    out: list[Result] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: out.append(ask(
        base, model, f"(copy {i}) {prompt}", max_tokens))) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    tokens = sum(r.tokens for r in out)
    drafted = sum(r.drafted or 0 for r in out) if any(r.drafted for r in out) else None
    accepted = sum(r.accepted or 0 for r in out) if drafted is not None else None
    return Result(tokens / wall, tokens, drafted, accepted, out[0].text)


def lmscli_targets(stack: contextlib.ExitStack, args: argparse.Namespace,
                   tmp: Path) -> tuple[str, dict[str, str]]:
    home = tmp / "lmscli-home"
    link = home / "models/bench/bench-GGUF" / args.model.name
    link.parent.mkdir(parents=True)
    link.symlink_to(args.model.resolve())
    env = os.environ | {"LMSCLI_HOME": str(home)}
    proc = spawn([sys.executable, "-m", "lmscli.server", "--port", str(args.lmscli_port)],
                 env, tmp / "lmscli.log")
    stack.callback(stop, proc)
    base = f"http://127.0.0.1:{args.lmscli_port}"
    wait_ready(base + "/lmstudio-greeting", proc, tmp / "lmscli.log")
    key = httpx.get(base + "/api/v0/models", timeout=30).json()["data"][0]["id"]
    names = {}
    for mode in ("off", "ngram"):
        body = {"model": key, "identifier": f"spec-{mode}", "context_length": args.ctx,
                "parallel": args.streams, "speculative": mode}
        r = httpx.post(base + "/lmscli/models/load", json=body, timeout=300)
        if '"success"' not in r.text:
            raise SystemExit(f"lmscli load: {r.text[:300]}")
        names[f"lmscli {mode}"] = f"spec-{mode}"
    return base, names


@contextlib.contextmanager
def llama_server(args: argparse.Namespace, tmp: Path, kind: str) -> Any:
    cmd = [str(args.llama_server), "-m", str(args.model), "--host", "127.0.0.1",
           "--port", str(args.llama_port), "-np", str(args.streams), "--kv-unified",
           "-c", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads),
           "--no-webui", "--spec-type", kind]
    log("llama-server:", " ".join(cmd[1:]))
    proc = spawn(cmd, dict(os.environ), tmp / f"llama-{kind}.log")
    try:
        wait_ready(f"http://127.0.0.1:{args.llama_port}/health", proc, tmp / f"llama-{kind}.log")
        yield f"http://127.0.0.1:{args.llama_port}"
    finally:
        stop(proc)


def measure(base: str, model: str, args: argparse.Namespace,
            texts: dict[str, str]) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = {}
    for workload, prompt in texts.items():
        ask_together(base, model, prompt, 16, args.streams)  # warm the slot and the pages
        out[workload] = [ask_together(base, model, prompt, args.max_tokens, args.streams)
                         for _ in range(args.runs)]
        med = statistics.median(r.tokens_per_s for r in out[workload])
        log(f"  {workload}: {med:.1f} tok/s")
    return out


def table(results: dict[str, dict[str, list[Result]]], args: argparse.Namespace) -> str:
    rows = [f"model {args.model.name}, {args.runs} runs, {args.max_tokens} tokens max, "
            f"{args.streams} stream(s), {args.threads} threads, greedy",
            f"{'workload':<9} {'server':<26} {'tok/s':>7} {'vs off':>7} {'vs best ls':>10} "
            f"{'accepted/drafted':>17}"]
    for workload in [w for w in WORKLOADS if w in args.workloads.split(",")]:
        rates = {name: statistics.median(r.tokens_per_s for r in runs[workload])
                 for name, runs in results.items()}
        best_llama = max((v for k, v in rates.items()
                          if k.startswith("llama-server ngram")), default=float("nan"))
        for name, runs in results.items():
            last = runs[workload][-1]
            drafts = f"{last.accepted}/{last.drafted}" if last.drafted is not None else "-"
            rows.append(f"{workload:<9} {name:<26} {rates[name]:7.1f} "
                        f"{rates[name] / rates['lmscli off']:7.2f} "
                        f"{rates[name] / best_llama:10.2f} {drafts:>17}")
        same = results["lmscli ngram"][workload][0].text == \
            results["lmscli off"][workload][0].text
        rows.append(f"{workload:<9} lmscli ngram's answer is the one without drafting: "
                    f"{'yes' if same else 'NO'}")
    return "\n".join(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=int, default=1)
    p.add_argument("--max-tokens", type=int, default=400)
    p.add_argument("--ctx", type=int, default=4096)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workloads", default=",".join(WORKLOADS))
    p.add_argument("--types", default=",".join(LLAMA_TYPES),
                   help="llama-server --spec-type values to run besides none")
    p.add_argument("--model", type=Path)
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    p.add_argument("--lmscli-port", type=int, default=18331)
    p.add_argument("--llama-port", type=int, default=18332)
    args = p.parse_args(argv)
    args.model = args.model or default_model()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    texts = {k: v for k, v in prompts().items() if k in args.workloads.split(",")}
    results: dict[str, dict[str, list[Result]]] = {}
    with tempfile.TemporaryDirectory(prefix="lmscli-spec-") as tmp_name, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        base, names = lmscli_targets(stack, args, tmp)
        for label, model in names.items():
            log(label)
            results[label] = measure(base, model, args, texts)
        stack.close()  # lmscli's server off before llama-server runs
        for kind in ("none", *[t for t in args.types.split(",") if t]):
            log(f"llama-server {kind}")
            with llama_server(args, tmp, kind) as llama_base:
                results[f"llama-server {kind}"] = measure(llama_base, "m", args, texts)
    print(table(results, args))


if __name__ == "__main__":
    main()
