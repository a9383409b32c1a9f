"""The prompt cache beyond the slots: lmscli vs. llama-server, a restart, and agents' sessions.

    .venv/bin/python bench/prompt_cache.py turns [--ks 2,4,6,12] [--rounds 3]
    .venv/bin/python bench/prompt_cache.py restart [--reps 3]
    .venv/bin/python bench/prompt_cache.py replay [--sessions bench/agent_sessions/*.json]
    .venv/bin/python bench/prompt_cache.py break-even

``turns``: K conversations, each with its own ~1,000-token system prompt, take turns on a
server with 4 slots (lmscli, and llama-server with its defaults, host-RAM cache included: same
GGUF, slots, context and threads). Round 1 fills the caches; from round 2 on it records each
turn's time to first token and cached prompt tokens. Prints medians and lmscli / llama-server
ratios per K (target: TTFT ratio <= 1.0 at every K).

``restart`` (lmscli only): a conversation's first turn on a fresh server, after a stop, start
and load, against a cold start of an unseen prompt of the same size.

``replay``: the recorded request bodies of real Claude Code and Codex sessions
(bench/agent_sessions/) sent in order to lmscli; prints the share of each prompt that came from
the cache (target: >= 95% from the second request on). Needs a model with a context that holds
them (--model, default Qwen2.5-Coder 0.5B at 32k).

``break-even``: in process, the time to decode N prompt tokens against the time to save and
restore their state, for the MIN_SAVE / MIN_RESTORE thresholds in lmscli/engine/base.py.

llama-server comes from ``bash bench/build_llama_server.sh``. Progress goes to stderr, the
table to stdout. Never run it while anything else computes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from parallel import (
    LLAMA_SERVER,
    MODEL_CACHE,
    SAMPLING,
    default_model,
    load_lmscli,
    log,
    spawn,
    start_llama_server,
    stop,
    wait_ready,
)

QWEN_REL = "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
SESSIONS = Path(__file__).parent / "agent_sessions"
TOPICS = ("lighthouses", "orchards", "railways", "glaciers", "bakeries", "observatories",
          "harbours", "libraries", "vineyards", "foundries", "monasteries", "canals",
          "beehives", "mines", "ferries", "windmills")
QUESTIONS = ("Which item is the oldest?", "Name two of them.", "What colour is the third?",
             "Summarise in one line.", "Which one is largest?")


def system_prompt(tag: str, topic: str, facts: int) -> str:
    lines = [f"You are the archivist of {topic} ({tag}). Facts you know:"]
    for i in range(facts):
        lines.append(f"- Record {i} of the {topic}: item {i * 7 % 97} was built in year "
                     f"{1700 + i * 3}, painted shade {i * 13 % 41} and keeps {i % 9} bells.")
    return "\n".join(lines)


# -- one request ----------------------------------------------------------------------------

def chat(client: httpx.Client, base: str, model: str, messages: list[dict[str, str]],
         max_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat turn: time to first token, its answer and cached tokens."""
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}} | SAMPLING
    sent, first, text, usage, timings = time.perf_counter(), None, [], {}, {}
    with client.stream("POST", base + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.read()[:300]!r}")
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            delta = (event.get("choices") or [{}])[0].get("delta", {})
            if delta.get("content"):
                first = first or time.perf_counter()
                text.append(delta["content"])
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens", timings.get("cache_n", 0)) or 0
    return {"ttft": (first or time.perf_counter()) - sent, "text": "".join(text),
            "prompt": usage.get("prompt_tokens", 0), "cached": cached}


def fresh_client() -> httpx.Client:
    """A new connection per request: llama-server closes kept-alive ones under our feet."""
    return httpx.Client(timeout=3600, limits=httpx.Limits(max_keepalive_connections=0))


# -- servers --------------------------------------------------------------------------------

def lmscli_home(tmp: Path, model: Path) -> Path:
    home = tmp / "lmscli-home"
    link = home / "models/bench/bench-GGUF" / model.name
    if not link.exists():
        link.parent.mkdir(parents=True)
        link.symlink_to(model.resolve())
    return home


def start_lmscli(stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path,
                 *extra: str) -> tuple[str, str, Any]:
    home = lmscli_home(tmp, args.model)
    env = os.environ | {"LMSCLI_HOME": str(home)}
    log_file = tmp / "lmscli.log"
    proc = spawn([sys.executable, "-m", "lmscli.server", "--port", str(args.lmscli_port),
                  *args.lmscli_arg, *extra], env, log_file)
    stack.callback(stop, proc)
    base = f"http://127.0.0.1:{args.lmscli_port}"
    wait_ready(base + "/lmstudio-greeting", proc, log_file)
    key = httpx.get(base + "/api/v0/models", timeout=30).json()["data"][0]["id"]
    info = load_lmscli(base, key, args.ctx, args.parallel)
    return base, info["identifier"], proc


# -- turns ----------------------------------------------------------------------------------

def conversations(client: httpx.Client, base: str, model: str, k: int, args: argparse.Namespace,
                  tag: str) -> list[dict[str, Any]]:
    chats = [[{"role": "system", "content": system_prompt(f"{tag}-{i}", TOPICS[i % 16],
                                                         args.facts)}] for i in range(k)]
    measured = []
    for rnd in range(args.rounds):
        for messages in chats:
            messages.append({"role": "user", "content": QUESTIONS[rnd % len(QUESTIONS)]})
            turn = chat(client, base, model, messages, args.max_tokens)
            messages.append({"role": "assistant", "content": turn["text"]})
            if rnd:
                measured.append(turn)
    return measured


def run_turns(args: argparse.Namespace) -> None:
    rows = []
    with tempfile.TemporaryDirectory(prefix="lmscli-bench-") as tmp, \
            contextlib.ExitStack() as stack, fresh_client() as client:
        targets = {"lmscli": start_lmscli(stack, args, Path(tmp))[:2]}
        targets["llama-server"] = (f"http://127.0.0.1:{args.llama_port}",
                                   start_llama_server(stack, args, Path(tmp)).model)
        for k in args.ks:
            row: dict[str, Any] = {"k": k}
            for name, (base, model) in targets.items():
                log(f"K={k}: {name}")
                turns = conversations(client, base, model, k, args, f"k{k}")
                row[name] = {"ttft": statistics.median(t["ttft"] for t in turns),
                             "cached": statistics.median(t["cached"] for t in turns),
                             "prompt": statistics.median(t["prompt"] for t in turns)}
            rows.append(row)
    print(f"model: {args.model.name}  slots: {args.parallel}  ctx: {args.ctx}  "
          f"rounds: {args.rounds} (round 1 not counted)  cores: {os.cpu_count()}")
    print(f"{'K':>3} {'prompt':>7} {'lmscli TTFT':>12} {'llama-server':>13} {'ratio':>6} "
          f"{'cached lmscli':>14} {'cached l-s':>11}")
    for row in rows:
        a, b = row["lmscli"], row["llama-server"]
        print(f"{row['k']:>3} {a['prompt']:>7.0f} {a['ttft']:>11.3f}s {b['ttft']:>12.3f}s "
              f"{a['ttft'] / b['ttft']:>6.2f} {a['cached']:>14.0f} {b['cached']:>11.0f}")


# -- restart --------------------------------------------------------------------------------

def run_restart(args: argparse.Namespace) -> None:
    warm, cold = [], []
    with tempfile.TemporaryDirectory(prefix="lmscli-bench-") as tmp, fresh_client() as client:
        for rep in range(args.reps):
            seen = [{"role": "system", "content": system_prompt(f"r{rep}", TOPICS[rep],
                                                                args.facts)},
                    {"role": "user", "content": QUESTIONS[0]}]
            unseen = [{"role": "system", "content": system_prompt(f"u{rep}", TOPICS[rep + 8],
                                                                  args.facts)},
                      {"role": "user", "content": QUESTIONS[0]}]
            with contextlib.ExitStack() as stack:
                base, model, _ = start_lmscli(stack, args, Path(tmp))
                chat(client, base, model, seen, args.max_tokens)
            with contextlib.ExitStack() as stack:  # stopped, started and loaded again
                base, model, _ = start_lmscli(stack, args, Path(tmp))
                cold.append(chat(client, base, model, unseen, args.max_tokens))
                warm.append(chat(client, base, model, seen, args.max_tokens))
            log(f"rep {rep}: cold {cold[-1]['ttft']:.3f}s, after restart "
                f"{warm[-1]['ttft']:.3f}s ({warm[-1]['cached']} cached)")
    c, w = (statistics.median(t["ttft"] for t in x) for x in (cold, warm))
    print(f"model: {args.model.name}  reps: {args.reps}  prompt: {warm[0]['prompt']} tokens")
    print(f"first turn after a restart, from the disk cache: {w:.3f}s "
          f"({statistics.median(t['cached'] for t in warm):.0f} cached)")
    print(f"cold start of an unseen prompt of the same size: {c:.3f}s   ratio {w / c:.3f}")


# -- replay ---------------------------------------------------------------------------------

def replay_body(body: dict[str, Any], model: str, api: str) -> dict[str, Any]:
    body = dict(body, model=model, stream=False, temperature=0)
    body["max_output_tokens" if api == "/v1/responses" else "max_tokens"] = 8
    body.pop("max_tokens" if api == "/v1/responses" else "max_output_tokens", None)
    return body


def cached_of(api: str, usage: dict[str, Any]) -> tuple[int, int]:
    if api == "/v1/responses":
        return usage.get("input_tokens", 0), \
            (usage.get("input_tokens_details") or {}).get("cached_tokens", 0)
    cached = usage.get("cache_read_input_tokens", 0)
    return usage.get("input_tokens", 0) + cached, cached


def run_replay(args: argparse.Namespace) -> None:
    files = args.sessions or sorted(SESSIONS.glob("*.json"))
    with tempfile.TemporaryDirectory(prefix="lmscli-bench-") as tmp, \
            contextlib.ExitStack() as stack, fresh_client() as client:
        base, model, _ = start_lmscli(stack, args, Path(tmp))
        for path in files:
            recorded = json.loads(Path(path).read_text())
            api = recorded["api"]
            print(f"{recorded['agent']} {recorded.get('version', '')} ({api}):")
            for req in recorded["requests"]:
                started = time.perf_counter()
                resp = client.post(base + api, json=replay_body(req["body"], model, api),
                                   headers={"anthropic-version": "2023-06-01"})
                took = time.perf_counter() - started
                if resp.status_code != 200:
                    print(f"  {req['session']}{req['turn']}: HTTP {resp.status_code} "
                          f"{resp.text[:200]}")
                    continue
                total, cached = cached_of(api, resp.json().get("usage") or {})
                share = cached / total if total else 0.0
                print(f"  session {req['session']} request {req['turn']}: {total:>6} prompt "
                      f"tokens, {cached:>6} cached ({share:6.1%}), {took:7.1f}s "
                      f"{req.get('purpose', '')}")


# -- break-even ------------------------------------------------------------------------------

def run_break_even(args: argparse.Namespace) -> None:
    from lmscli.engine import LoadOptions, ModelSpec, get_engine

    spec = ModelSpec(path=str(args.model), model_key="bench", max_context_length=args.ctx)
    inst: Any = get_engine("llama.cpp").load(spec, LoadOptions(context_length=args.ctx,
                                                               parallel=1))
    print(f"model: {args.model.name}   n = prompt tokens")
    print(f"{'n':>6} {'decode':>9} {'save':>9} {'restore':>9} {'bytes/token':>12}")
    try:
        for n in (8, 16, 32, 64, 128, 512, 2048):
            tokens = inst.tokenize(" ".join(["lighthouse"] * n))[:n]
            row = inst.call(lambda tokens=tokens: measure_state(inst, tokens))
            print(f"{n:>6} {row[0] * 1000:>7.1f}ms {row[1] * 1000:>7.2f}ms "
                  f"{row[2] * 1000:>7.2f}ms {row[3] / n:>12.0f}")
    finally:
        inst.close()


def measure_state(inst: Any, tokens: list[int]) -> tuple[float, float, float, int]:
    """On the engine's thread: decode ``tokens`` into sequence 0, save, clear, restore."""
    from lmscli.engine.slots import Batch

    decode, save, restore = [], [], []
    for _ in range(5):
        inst.backend.seq_rm(0, 0)
        t0 = time.perf_counter()
        for start in range(0, len(tokens), inst.backend.n_batch):
            batch = Batch()
            for pos in range(start, min(start + inst.backend.n_batch, len(tokens))):
                batch.add(tokens[pos], pos, 0, pos == len(tokens) - 1)
            assert inst.backend.decode(batch) == 0
        t1 = time.perf_counter()
        data = inst.backend.save_state(0)
        t2 = time.perf_counter()
        inst.backend.seq_rm(0, 0)
        t3 = time.perf_counter()
        assert inst.backend.restore_state(0, data)
        t4 = time.perf_counter()
        decode.append(t1 - t0)
        save.append(t2 - t1)
        restore.append(t4 - t3)
    inst.backend.seq_rm(0, 0)
    return (statistics.median(decode), statistics.median(save), statistics.median(restore),
            len(data))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=("turns", "restart", "replay", "break-even"))
    p.add_argument("--ks", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4, 6, 12])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--facts", type=int, default=30, help="~1,000-token system prompts")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--sessions", type=Path, nargs="*")
    p.add_argument("--model", type=Path, help="GGUF (default: the default model; Qwen2.5-Coder "
                   "0.5B for replay)")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    p.add_argument("--llama-arg", action="append", default=[])
    p.add_argument("--lmscli-arg", action="append", default=[],
                   help="e.g. --lmscli-arg=--cache-disk=0")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--ctx", type=int, default=None, help="total context (shared by slots)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--lmscli-port", type=int, default=18311)
    p.add_argument("--llama-port", type=int, default=18312)
    args = p.parse_args(argv)
    replay = args.mode == "replay"
    args.model = args.model or (MODEL_CACHE / QWEN_REL if replay else default_model())
    args.ctx = args.ctx or (32768 if replay else 8192)
    return args


def main() -> None:
    args = parse_args()
    {"turns": run_turns, "restart": run_restart, "replay": run_replay,
     "break-even": run_break_even}[args.mode](args)


if __name__ == "__main__":
    main()
