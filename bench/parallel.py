"""Parallel predictions: lmscli vs. llama.cpp's own llama-server, same GGUF, slots and threads.

Starts both servers (lmscli with ``parallel: 4`` in its load request, llama-server with
``-np 4 --kv-unified`` and the same total context and threads), runs the same streamed
``/v1/chat/completions`` workload against each, alternating between them rep by rep, and prints
medians over the reps and the lmscli / llama-server ratios:

- aggregate tokens/s with 1, 2, 4 and 8 concurrent streams;
- single-stream decode tokens/s and time to first token;
- time to first token of a short request sent while a 400-token answer streams;
- chunk gaps of one stream while another request's ~1,000-token prompt is processed.

    .venv/bin/python bench/parallel.py [--reps 5] [--quick] [--only lmscli|llama-server] [--json]

llama-server comes from ``bash bench/build_llama_server.sh`` (or ``--llama-server PATH``).
Progress goes to stderr, the table (or JSON) to stdout. Both servers are stopped on exit.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DEFAULT_MODEL_REL = "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CACHE = Path(os.environ.get("LMSCLI_TEST_MODELS",
                                  Path.home() / ".cache" / "lmscli-test" / "models"))
LLAMA_SERVER = (Path.home() / ".cache/lmscli-bench/llama-server/llama-cpp-python-0.3.36"
                / "build/bin/llama-server")
TARGETS = ("lmscli", "llama-server")
CONCURRENCY = (1, 2, 4, 8)
# the same explicit settings for both servers (their defaults differ): greedy
SAMPLING = {"temperature": 0, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
            "repeat_penalty": 1.1, "seed": 42}
STORY = ("Request {tag}: write a very long and detailed story about a lighthouse keeper, a "
         "storm and a ship in danger. Describe every character, every room and every hour.")
SHORT = "Request {tag}: what is the capital of France? Answer in one word."
FACT = "Note {i}: the {colour} lighthouse on pier {i} keeps {a} lamps, {b} ropes and a bell. "
COLOURS = ("red", "blue", "green", "white", "black", "yellow")


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- one streamed request -------------------------------------------------------------------

@dataclass
class Stream:
    sent: float  # perf_counter when the request went out
    chunks: list[float] = field(default_factory=list)  # arrival of chunks with text
    completion_tokens: int = 0
    prompt_tokens: int = 0
    done: float = 0.0

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent if self.chunks else float("nan")

    @property
    def decode_tps(self) -> float:
        """Tokens after the first over the time from the first to the last text chunk."""
        span = self.chunks[-1] - self.chunks[0] if self.chunks else 0.0
        return (self.completion_tokens - 1) / span if span > 0 else float("nan")


@dataclass
class Target:
    name: str
    base_url: str
    model: str
    pid: int
    client: httpx.AsyncClient | None = None

    async def stream(self, prompt: str, max_tokens: int,
                     on_chunk: Callable[[Stream], None] | None = None) -> Stream:
        assert self.client is not None
        body = {"model": self.model, "messages": [{"role": "user", "content": prompt}],
                "max_tokens": max_tokens, "stream": True,
                "stream_options": {"include_usage": True}} | SAMPLING
        result = Stream(time.perf_counter())
        async with self.client.stream("POST", self.base_url + "/v1/chat/completions",
                                      json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                raise RuntimeError(f"{self.name}: HTTP {response.status_code}: {text[:300]}")
            async for line in response.aiter_lines():
                if read_event(line, result) and on_chunk:
                    on_chunk(result)
        result.done = time.perf_counter()
        result.completion_tokens = result.completion_tokens or len(result.chunks)
        return result


def read_event(line: str, result: Stream) -> bool:
    """Records one SSE line; True when it carried text."""
    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
        return False
    data = json.loads(line[5:])
    if "error" in data:
        raise RuntimeError(f"stream error: {data['error']}")
    if data.get("usage"):
        result.completion_tokens = data["usage"].get("completion_tokens") or 0
        result.prompt_tokens = data["usage"].get("prompt_tokens") or 0
    choices = data.get("choices") or []
    if choices and (choices[0].get("delta") or {}).get("content"):
        result.chunks.append(time.perf_counter())
        return True
    return False


async def wait_chunks(stream_task: asyncio.Task, progress: list[Stream], count: int) -> None:
    """Until the watched stream has `count` text chunks (or has ended)."""
    while not stream_task.done() and (not progress or len(progress[0].chunks) < count):
        await asyncio.sleep(0.002)


def watcher(progress: list[Stream]) -> Callable[[Stream], None]:
    def on_chunk(stream: Stream) -> None:
        if not progress:
            progress.append(stream)
    return on_chunk


# -- the scenarios --------------------------------------------------------------------------

async def aggregate(target: Target, streams: int, max_tokens: int, tag: str) -> dict[str, float]:
    started = time.perf_counter()
    results = await asyncio.gather(*(
        target.stream(STORY.format(tag=f"{tag}-{k}"), max_tokens) for k in range(streams)))
    wall = max(r.done for r in results) - started
    tokens = sum(r.completion_tokens for r in results)
    return {"tps": tokens / wall, "tokens": tokens}


async def single(target: Target, max_tokens: int, tag: str) -> dict[str, float]:
    result = await target.stream(STORY.format(tag=tag), max_tokens)
    return {"tps": result.decode_tps, "ttft_ms": result.ttft * 1000,
            "tokens": result.completion_tokens}


async def short_during_long(target: Target, long_tokens: int, tag: str) -> dict[str, float]:
    """TTFT of a short request sent once a long answer has started streaming."""
    progress: list[Stream] = []
    long_task = asyncio.create_task(
        target.stream(STORY.format(tag=tag), long_tokens, watcher(progress)))
    await wait_chunks(long_task, progress, 8)
    short = await target.stream(SHORT.format(tag=tag), 8)
    long = await long_task
    overlap = bool(long.chunks and short.chunks) and long.chunks[-1] > short.chunks[0]
    return {"ttft_ms": short.ttft * 1000, "long_tokens": long.completion_tokens,
            "long_still_streaming": float(overlap)}


def long_prompt(tag: str, facts: int) -> str:
    lines = [FACT.format(i=i, colour=COLOURS[i % len(COLOURS)], a=i * 3 % 17 + 2,
                         b=i * 7 % 23 + 5) for i in range(facts)]
    return f"Document {tag}.\n" + "".join(lines) + "\nWhich pier keeps the most lamps?"


async def gaps_during_prompt(target: Target, stream_tokens: int, facts: int,
                             tag: str) -> dict[str, float]:
    """Chunk gaps of a streaming answer while another request's long prompt is processed."""
    progress: list[Stream] = []
    task = asyncio.create_task(
        target.stream(STORY.format(tag=tag), stream_tokens, watcher(progress)))
    await wait_chunks(task, progress, 8)
    big = await target.stream(long_prompt(tag, facts), 4)
    watched = await task
    window_end = big.chunks[0] if big.chunks else big.done
    before, during = split_gaps(watched.chunks, big.sent, window_end)
    return {"p99_gap_ms": percentile(during, 99) * 1000,
            "max_gap_ms": max(during, default=float("nan")) * 1000,
            "p99_gap_before_ms": percentile(before, 99) * 1000,
            "gaps_in_window": len(during), "prompt_ttft_ms": big.ttft * 1000,
            "prompt_tokens": big.prompt_tokens}


def split_gaps(times: list[float], start: float, end: float) -> tuple[list[float], list[float]]:
    """Gaps between consecutive chunks: those before `start`, and those overlapping
    [start, end]."""
    before, during = [], []
    for prev, cur in zip(times, times[1:], strict=False):
        if cur <= start:
            before.append(cur - prev)
        elif prev < end:
            during.append(cur - prev)
    return before, during


def percentile(values: list[float], pct: float) -> float:
    """Linear interpolation between closest ranks; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * pct / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


# -- noise: CPU time other processes took while a run went on ------------------------------

TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def busy_seconds() -> float:
    """CPU seconds all processes have spent busy since boot (Linux; NaN elsewhere)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return float("nan")
    user, nice, system, _idle, _iowait, irq, softirq, *rest = map(int, fields)
    return (user + nice + system + irq + softirq + (rest[0] if rest else 0)) / TICK


def process_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system, all threads) of these processes."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(stat[11]) + int(stat[12])
    return total / TICK


class Noise:
    """Share of the machine's CPUs that processes other than the servers and this script
    used between `start` and `share`, in percent."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = [*pids, os.getpid()]
        self.cpus = os.cpu_count() or 1

    def start(self) -> None:
        self.t0, self.busy0, self.ours0 = (time.perf_counter(), busy_seconds(),
                                           process_seconds(self.pids))

    def share(self) -> float:
        wall = time.perf_counter() - self.t0
        other = (busy_seconds() - self.busy0) - (process_seconds(self.pids) - self.ours0)
        return max(other, 0.0) / (wall * self.cpus) * 100 if wall > 0 else float("nan")


# -- servers --------------------------------------------------------------------------------

def default_model() -> Path:
    cached = MODEL_CACHE / DEFAULT_MODEL_REL
    if cached.exists():
        return cached
    from lmscli import catalog  # fetches it the way the tests do

    with tempfile.TemporaryDirectory() as tmp:
        os.environ.setdefault("LMSCLI_HOME", tmp)
        return catalog.get_model(catalog.DEFAULT_MODEL, models_dir=MODEL_CACHE).model.abs_path


def spawn(cmd: list[str], env: dict[str, str], log_file: Path) -> subprocess.Popen:
    """Runs in the temporary folder: ``python -m`` must not import lmscli from the caller's
    working directory instead of the one PYTHONPATH names."""
    with open(log_file, "wb") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=log_file.parent)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL what is left."""
    for sig, wait_s in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        if proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=wait_s)


def wait_ready(url: str, proc: subprocess.Popen, log_file: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_file.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"server exited with {proc.returncode}:\n{tail}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer in {timeout:.0f} s")


def start_lmscli(stack: contextlib.ExitStack, args: argparse.Namespace, tmp: Path) -> Target:
    home = tmp / "lmscli-home"
    link = home / "models/bench/bench-GGUF" / args.model.name
    link.parent.mkdir(parents=True)
    link.symlink_to(args.model.resolve())
    env = os.environ | {"LMSCLI_HOME": str(home)}
    log_file = tmp / "lmscli.log"
    args.lmscli_package = subprocess.run(
        [sys.executable, "-c", "import lmscli, os; print(os.path.dirname(lmscli.__file__))"],
        env=env, cwd=tmp, capture_output=True, text=True, check=True).stdout.strip()
    log(f"lmscli: the server imports {args.lmscli_package}")
    proc = spawn([sys.executable, "-m", "lmscli.server", "--port", str(args.lmscli_port)],
                 env, log_file)
    stack.callback(stop, proc)
    base = f"http://127.0.0.1:{args.lmscli_port}"
    wait_ready(base + "/lmstudio-greeting", proc, log_file)
    key = httpx.get(base + "/api/v0/models", timeout=30).json()["data"][0]["id"]
    info = load_lmscli(base, key, args.ctx, args.parallel)
    args.lmscli_parallel = info.get("parallel")
    log(f"lmscli: loaded {info.get('identifier')} (context {info.get('contextLength')}, "
        f"parallel reported: {info.get('parallel')})")
    return Target("lmscli", base, info["identifier"], proc.pid)


def load_lmscli(base: str, key: str, ctx: int, parallel: int) -> dict[str, Any]:
    """POST /lmscli/models/load with ``parallel`` (an older server ignores the field)."""
    body = {"model": key, "context_length": ctx, "parallel": parallel}
    with httpx.stream("POST", base + "/lmscli/models/load", json=body, timeout=300) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"lmscli load: HTTP {resp.status_code}: {resp.read()[:300]!r}")
        for line in resp.iter_lines():
            event = json.loads(line) if line.strip() else {}
            if event.get("type") == "success":
                return event["info"]
            if event.get("type") == "error":
                raise RuntimeError(f"lmscli load: {event['error']['message']}")
    raise RuntimeError("lmscli load: no result")


def start_llama_server(stack: contextlib.ExitStack, args: argparse.Namespace,
                       tmp: Path) -> Target:
    if not args.llama_server.exists():
        raise SystemExit(f"{args.llama_server} is missing: run bash bench/build_llama_server.sh")
    cmd = [str(args.llama_server), "-m", str(args.model), "--host", "127.0.0.1",
           "--port", str(args.llama_port), "-np", str(args.parallel), "--kv-unified",
           "--cont-batching", "-c", str(args.ctx), "-t", str(args.threads),
           "-tb", str(args.threads), "-b", str(args.batch), "-ub", str(args.batch),
           "--no-webui", *args.llama_arg]
    log("llama-server:", " ".join(cmd[1:]))
    log_file = tmp / "llama-server.log"
    proc = spawn(cmd, dict(os.environ), log_file)
    stack.callback(stop, proc)
    base = f"http://127.0.0.1:{args.llama_port}"
    wait_ready(base + "/health", proc, log_file)
    return Target("llama-server", base, args.model.stem, proc.pid)


@contextlib.contextmanager
def servers(args: argparse.Namespace) -> Iterator[list[Target]]:
    with tempfile.TemporaryDirectory(prefix="lmscli-bench-") as tmp, \
            contextlib.ExitStack() as stack:
        starters = {"lmscli": start_lmscli, "llama-server": start_llama_server}
        yield [starters[name](stack, args, Path(tmp)) for name in args.targets]


# -- running and reporting ------------------------------------------------------------------

Runs = dict[str, dict[str, list[dict[str, float]]]]  # scenario -> target -> per-rep results


async def run_all(targets: list[Target], args: argparse.Namespace) -> Runs:
    runs: Runs = {}
    # a fresh connection per request: llama-server closes kept-alive ones under our feet
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=10), limits=limits) as client:
        for target in targets:
            target.client = client
            await target.stream("Say hi.", 4)  # warm-up
        noise = Noise([t.pid for t in targets])
        for name, make in scenarios(args):
            for rep in range(args.reps):
                order = targets if rep % 2 == 0 else targets[::-1]  # noise hits both alike
                for target in order:
                    log(f"{name} rep {rep + 1}/{args.reps} {target.name}")
                    result = await measured(make, target, f"{name}-{rep}", noise, args)
                    runs.setdefault(name, {}).setdefault(target.name, []).append(result)
    return runs


async def measured(make: Callable[..., Any], target: Target, tag: str, noise: Noise,
                   args: argparse.Namespace) -> dict[str, float]:
    """One run; again (up to --retries times) while other processes took more than
    --max-other percent of the CPUs."""
    for attempt in range(args.retries + 1):
        if args.max_other < 100:
            await quiet(noise, args.max_other, args.quiet_wait)
        noise.start()
        result = await make(target, f"{tag}-{attempt}")
        result["other_cpu_pct"] = noise.share()
        log("   ", {k: round(v, 1) for k, v in result.items()})
        if not result["other_cpu_pct"] > args.max_other:
            break
        log(f"    other processes took {result['other_cpu_pct']:.0f}% of the CPUs: again")
    return result


async def quiet(noise: Noise, max_other: float, timeout: float) -> None:
    """Waits (at most `timeout` s) for a second in which other processes stay under
    `max_other` percent of the CPUs."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        noise.start()
        await asyncio.sleep(1)
        if noise.share() <= max_other:
            return
    log(f"    the machine stayed busy for {timeout:.0f} s: running anyway")


def scenarios(args: argparse.Namespace) -> list[tuple[str, Callable[..., Any]]]:
    out: list[tuple[str, Callable[..., Any]]] = [
        (f"aggregate-{n}", lambda t, tag, n=n: aggregate(t, n, args.max_tokens, tag))
        for n in CONCURRENCY]
    out.append(("single", lambda t, tag: single(t, args.max_tokens, tag)))
    out.append(("short-during-long", lambda t, tag: short_during_long(t, args.long_tokens, tag)))
    out.append(("gaps-during-prompt",
                lambda t, tag: gaps_during_prompt(t, args.long_tokens, args.facts, tag)))
    return out


def medians(runs: Runs) -> dict[str, dict[str, dict[str, float]]]:
    return {scenario: {target: {key: statistics.median(r[key] for r in reps) for key in reps[0]}
                       for target, reps in per_target.items()}
            for scenario, per_target in runs.items()}


def table(med: dict[str, dict[str, dict[str, float]]], meta: dict[str, Any]) -> str:
    rows = [("aggregate tok/s, 1 stream", "aggregate-1", "tps", "ratio")]
    rows += [(f"aggregate tok/s, {n} streams", f"aggregate-{n}", "tps", "ratio")
             for n in CONCURRENCY[1:]]
    rows += [("single stream decode tok/s", "single", "tps", "ratio"),
             ("single stream TTFT ms", "single", "ttft_ms", "diff"),
             ("short TTFT ms while a long answer streams", "short-during-long", "ttft_ms",
              "diff"),
             ("  (long answer tokens)", "short-during-long", "long_tokens", ""),
             ("p99 chunk gap ms while a long prompt runs", "gaps-during-prompt", "p99_gap_ms",
              "diff"),
             ("  max chunk gap ms in that window", "gaps-during-prompt", "max_gap_ms", "diff"),
             ("  p99 chunk gap ms before it", "gaps-during-prompt", "p99_gap_before_ms",
              "diff"),
             ("  long prompt: TTFT ms", "gaps-during-prompt", "prompt_ttft_ms", "diff"),
             ("  long prompt: prompt tokens", "gaps-during-prompt", "prompt_tokens", "")]
    lines = [" ".join(f"{k}={v}" for k, v in meta.items()),
             f"{'medians':<44}{'lmscli':>10}{'llama-server':>14}{'lms/llama':>11}"]
    for label, scenario, key, compare in rows:
        values = [med.get(scenario, {}).get(t, {}).get(key) for t in TARGETS]
        ours, theirs = values
        lines.append(f"{label:<44}{fmt(ours):>10}{fmt(theirs):>14}"
                     f"{versus(values, compare):>11}")
    return "\n".join(lines)


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def versus(values: list[float | None], compare: str) -> str:
    ours, theirs = values
    if ours is None or theirs is None or not compare:
        return ""
    if compare == "ratio":
        return f"{ours / theirs:.3f}" if theirs else ""
    return f"{ours - theirs:+.1f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=TARGETS, help="run one server only")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="2 reps, shorter answers")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--model", type=Path, help="GGUF (default: the default model)")
    p.add_argument("--llama-server", type=Path, default=LLAMA_SERVER)
    p.add_argument("--llama-arg", action="append", default=[],
                   help="extra llama-server argument (repeatable, e.g. --llama-arg=-fa=off)")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--ctx", type=int, default=8192, help="total context (shared by slots)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch", type=int, default=512, help="llama-server -b/-ub (lmscli's)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--long-tokens", type=int, default=400)
    p.add_argument("--facts", type=int, default=37, help="~1,000 prompt tokens")
    p.add_argument("--max-other", type=float, default=100.0,
                   help="redo a run when other processes took more than this %% of the CPUs")
    p.add_argument("--retries", type=int, default=2, help="redos per run (with --max-other)")
    p.add_argument("--quiet-wait", type=float, default=60,
                   help="with --max-other: wait up to this many seconds for a quiet second "
                        "before each run")
    p.add_argument("--lmscli-port", type=int, default=18301)
    p.add_argument("--llama-port", type=int, default=18302)
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.max_tokens = min(args.reps, 2), 64
    args.targets = [args.only] if args.only else list(TARGETS)
    args.model = args.model or default_model()
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup on kill
    load_before = os.getloadavg()
    started = time.time()
    with servers(args) as targets:
        runs = asyncio.run(run_all(targets, args))
    meta = {"model": args.model.name, "ctx": args.ctx, "parallel": args.parallel,
            "lmscli_parallel": getattr(args, "lmscli_parallel", None),
            "threads": args.threads, "reps": args.reps, "max_other": args.max_other,
            "max_tokens": args.max_tokens,
            "long_tokens": args.long_tokens, "lmscli": getattr(args, "lmscli_package", None),
            "load_before": f"{load_before[0]:.2f}", "load_after": f"{os.getloadavg()[0]:.2f}",
            "seconds": round(time.time() - started)}
    med = medians(runs)
    other = [r["other_cpu_pct"] for per in runs.values() for rs in per.values() for r in rs]
    meta |= {"other_cpu_pct_median": f"{statistics.median(other):.0f}",
             "other_cpu_pct_max": f"{max(other):.0f}"}
    if args.json:
        print(json.dumps({"meta": meta, "medians": med, "runs": runs}, indent=1))
    else:
        print(table(med, meta))


if __name__ == "__main__":
    main()
