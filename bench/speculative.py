"""Speculative decoding: lmscli with and without drafting from the context, against llama.cpp's
own llama-server without drafting and with each of its n-gram types; same GGUF and threads,
greedy, no repeat penalty (llama-server's default; lmscli's is 1.1).

Four workloads, each a streamed ``/v1/chat/completions`` request:

- rewrite: a ~800-token Python file, asked back with one identifier renamed;
- summary: a text to summarise, quoting its sentences;
- prose: a story, with nothing in the prompt to copy, asked again each run (as a retry is);
- fresh: a new story or explanation each run, with nothing anywhere to copy (the never-slower
  guard).

All the servers run side by side, and each run asks them in turn: the machine's speed drifts
by a fifth within minutes on shared cores, and an idle server takes no CPU.

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

import httpx
from parallel import LLAMA_SERVER, default_model, log, spawn, stop, wait_ready

WORKLOADS = ("rewrite", "summary", "prose", "fresh")
FRESH = ("Write a long story about a cat who learns to fly a kite in the wind.",
         "Write a long story about an old baker who opens a shop on the moon.",
         "Explain in detail how the gears of a bicycle work, for a child.",
         "Describe a long journey by train across the mountains in winter.",
         "Write a long letter from a sailor to his sister about a storm at sea.",
         "Write a long story about a robot who tends a garden alone.",
         "Explain in detail how bread is made, from the field to the table.",
         "Write a long story about two friends lost in a city at night.")
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


def prompts() -> dict[str, tuple[str, ...]]:
    """Each workload's prompts: the warm-up asks the first, the runs the others in turn."""
    story = ("The lighthouse keeper climbed the stairs every evening at six. She lit the lamp, "
             "wound the clock and wrote the weather in her book. One night the storm broke the "
             "window, and the lamp went out. She carried a lantern to the top and held it "
             "there until dawn, when the fishing boats came home safely. ") * 4
    return {
        "rewrite": ("Rewrite this Python code with the name items changed to products "
                    f"everywhere. Reply with the code only.\n\n{code_file()}",),
        "summary": (f"Summarise this text, quoting its sentences word for word:\n\n{story}",),
        "prose": ("Write a long story about a fox who learns to sail across a cold sea.",),
        "fresh": FRESH,  # a new ask every run: nothing earlier to copy
    }


@dataclass
class Result:
    tokens_per_s: float
    tokens: int
    drafted: int | None
    accepted: int | None
    text: str


def ask(base: str, fields: dict[str, str], prompt: str, max_tokens: int) -> Result:
    """One greedy streamed reply; draft counts from lmscli's usage or llama-server's timings."""
    body = fields | {"messages": [{"role": "user", "content": prompt}],
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


def ask_together(base: str, fields: dict[str, str], prompt: str, max_tokens: int,
                 streams: int) -> Result:
    """``streams`` copies at once; the aggregate rate is all tokens over the whole span."""
    if streams == 1:
        return ask(base, fields, prompt, max_tokens)
    out: list[Result] = []
    started = time.perf_counter()
    threads = [threading.Thread(target=lambda i=i: out.append(ask(
        base, fields, f"(copy {i}) {prompt}", max_tokens))) for i in range(streams)]
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
                   tmp: Path) -> dict[str, tuple[str, dict[str, str]]]:
    """One instance, asked with "speculative" "off" or "ngram" per request: two instances
    of one server slow each other once both have run (libgomp's threads spin less when
    there are more of them than cores), which would weigh on the first one measured."""
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
    body = {"model": key, "identifier": "spec", "context_length": args.ctx,
            "parallel": args.streams, "speculative": "ngram"}
    r = httpx.post(base + "/lmscli/models/load", json=body, timeout=300)
    if '"success"' not in r.text:
        raise SystemExit(f"lmscli load: {r.text[:300]}")
    return {f"lmscli {mode}": (base, {"model": "spec", "speculative": mode})
            for mode in ("off", "ngram")}


def llama_server(stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path, kind: str,
                 port: int) -> str:
    cmd = [str(args.llama_server), "-m", str(args.model), "--host", "127.0.0.1",
           "--port", str(port), "-np", str(args.streams), "--kv-unified",
           "-c", str(args.ctx), "-t", str(args.threads), "-tb", str(args.threads),
           "--no-webui", "--spec-type", kind]
    log("llama-server:", " ".join(cmd[1:]))
    proc = spawn(cmd, dict(os.environ), tmp / f"llama-{kind}.log")
    stack.callback(stop, proc)
    wait_ready(f"http://127.0.0.1:{port}/health", proc, tmp / f"llama-{kind}.log")
    return f"http://127.0.0.1:{port}"


def measure(targets: dict[str, tuple[str, dict[str, str]]], args: argparse.Namespace,
            texts: dict[str, tuple[str, ...]]) -> dict[str, dict[str, list[Result]]]:
    """Each run asks every target in turn (an idle server takes no CPU), so that the
    machine's drift, which is large on shared cores, weighs on all of them alike."""
    out: dict[str, dict[str, list[Result]]] = {name: {} for name in targets}
    for workload, asks in texts.items():
        for name, (base, fields) in targets.items():  # warm the slot and the pages
            ask_together(base, fields, asks[0], 16, args.streams)
            out[name][workload] = []
        for run in range(args.runs):
            prompt = asks[1 + run % (len(asks) - 1)] if len(asks) > 1 else asks[0]
            for name, (base, fields) in targets.items():
                out[name][workload].append(
                    ask_together(base, fields, prompt, args.max_tokens, args.streams))
        for name in targets:
            runs = out[name][workload]
            each = ", ".join(f"{r.tokens_per_s:.1f} ({r.accepted}/{r.drafted}, {r.tokens} tok)"
                             for r in runs)
            med = statistics.median(r.tokens_per_s for r in runs)
            log(f"  {workload} {name}: {med:.1f} tok/s; each run: {each}")
    return out


def table(results: dict[str, dict[str, list[Result]]], args: argparse.Namespace) -> str:
    rows = [f"model {args.model.name}, {args.runs} runs, {args.max_tokens} tokens max, "
            f"{args.streams} stream(s), {args.threads} threads, greedy",
            f"{'workload':<9} {'server':<26} {'tok/s':>7} {'vs off':>7} {'vs best ls':>10} "
            f"{'accepted/drafted':>17}",
            "(vs off: the median of each run's ratio to lmscli off's run beside it; "
            "accepted/drafted: all runs)"]
    for workload in [w for w in WORKLOADS if w in args.workloads.split(",")]:
        rates = {name: statistics.median(r.tokens_per_s for r in runs[workload])
                 for name, runs in results.items()}
        best_llama = max((v for k, v in rates.items()
                          if k.startswith("llama-server ngram")), default=float("nan"))
        off = results["lmscli off"][workload]
        for name, runs in results.items():
            mine = runs[workload]
            drafts = (f"{sum(r.accepted or 0 for r in mine)}/{sum(r.drafted or 0 for r in mine)}"
                      if any(r.drafted is not None for r in mine) else "-")
            # each run against lmscli off's run beside it, then the median
            paired = statistics.median(r.tokens_per_s / o.tokens_per_s
                                       for r, o in zip(mine, off, strict=True))
            rows.append(f"{workload:<9} {name:<26} {rates[name]:7.1f} {paired:7.2f} "
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
    p.add_argument("--llama-port", type=int, default=18332, help="the first of its ports")
    args = p.parse_args(argv)
    args.model = args.model or default_model()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    texts = {k: v for k, v in prompts().items() if k in args.workloads.split(",")}
    with tempfile.TemporaryDirectory(prefix="lmscli-spec-") as tmp_name, \
            contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        targets = lmscli_targets(stack, args, tmp)
        for i, kind in enumerate(("none", *[t for t in args.types.split(",") if t])):
            port = args.llama_port + i
            targets[f"llama-server {kind}"] = (llama_server(stack, args, tmp, kind, port),
                                               {"model": "m"})
        results = measure(targets, args, texts)
    print(table(results, args))


if __name__ == "__main__":
    main()
