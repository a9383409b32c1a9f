"""All rendering of data: tables, JSON, sizes, durations, progress."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any

from lmscli.cli import console

ARCH_NAMES = {"llama": "Llama", "gemma3": "Gemma 3", "gemma2": "Gemma 2", "gemma": "Gemma",
              "qwen2": "Qwen2", "qwen3": "Qwen3", "phi3": "Phi 3", "mistral": "Mistral",
              "bert": "BERT", "nomic-bert": "Nomic BERT"}


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def size_1000(n: int | float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000:
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.2f} TB"


def size_1024(n: int | float) -> str:
    for unit in ("Bytes", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.2f} {unit}" if unit != "Bytes" else f"{int(n)} Bytes"
        n /= 1024
    return f"{n:.2f} TiB"


def elapsed(seconds: float) -> str:
    """lms's formatElapsedTime: 512.00ms, 4.22s, 1m 2.00s, 1h 0m 3.00s."""
    if seconds < 1:
        return f"{seconds * 1000:.2f}ms"
    if seconds < 60:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{int(minutes)}m {secs:.2f}s"
    hours, minutes = divmod(minutes, 60)
    return f"{int(hours)}h {int(minutes)}m {secs:.2f}s"


def lean_duration(seconds: float) -> str:
    """lms's formatTimeLean: 45s, 12m, 1h."""
    if seconds < 60:
        return f"{round(seconds)}s"
    if seconds < 3600:
        return f"{round(seconds / 60)}m"
    return f"{round(seconds / 3600)}h"


def arch_name(arch: str | None) -> str:
    return ARCH_NAMES.get(arch or "", arch or "")


def columns(rows: Sequence[Sequence[str]]) -> list[str]:
    """A columnify table: left-aligned, four spaces between columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("    ".join(cells).rstrip())
    return lines


def table(rows: list[list[str]], marks: Iterable[str] = ()) -> None:
    """Print header + rows to stdout; ``marks`` is a green tail per row (e.g. ✓ LOADED)."""
    marks = list(marks)
    for i, line in enumerate(columns(rows)):
        mark = marks[i - 1] if i > 0 and i - 1 < len(marks) else ""
        if i == 0:
            console.out.print(line, style="bold", markup=False)
        else:
            console.out.print(line, markup=False, end="")
            console.out.print(f"    [ok]{mark}[/ok]" if mark else "")


# -- ls ---------------------------------------------------------------------------------------

def models_table(models: list[dict[str, Any]], loaded_counts: dict[str, int]) -> None:
    total = sum(m["sizeBytes"] for m in models)
    noun = "model" if len(models) == 1 else "models"
    console.out.print(f"\nYou have {len(models)} {noun}, taking up {size_1000(total)} of disk "
                      "space.\n", markup=False)
    for kind, title in (("llm", "LLM"), ("embedding", "EMBEDDING")):
        group = sorted((m for m in models if m["type"] == kind), key=lambda m: m["modelKey"])
        if not group:
            continue
        rows = [[title, "PARAMS", "ARCH", "SIZE", "DEVICE"]]
        marks = []
        for m in group:
            rows.append([m["modelKey"], m.get("paramsString") or "",
                         arch_name(m.get("architecture")), size_1000(m["sizeBytes"]), "Local"])
            n = loaded_counts.get(m["modelKey"], 0)
            marks.append("" if not n else "✓ LOADED" if n == 1 else f"✓ LOADED ({n})")
        table(rows, marks)
        console.out.print()


# -- ps ---------------------------------------------------------------------------------------

def loaded_table(models: list[dict[str, Any]]) -> None:
    rows = [["IDENTIFIER", "MODEL", "STATUS", "SIZE", "CONTEXT", "PARALLEL", "DEVICE", "TTL"]]
    for m in sorted(models, key=lambda m: m["identifier"]):
        ttl = ""
        if m.get("ttlMs"):
            ttl = (f"{lean_duration(m['ttlRemainingMs'] / 1000)} / "
                   f"{lean_duration(m['ttlMs'] / 1000)}")
        rows.append([m["identifier"], m["modelKey"], str(m["status"]).upper(),
                     size_1000(m["sizeBytes"]), str(m["contextLength"]),
                     str(m.get("parallel") or "-"), "Local", ttl])
    table(rows)


# -- progress ---------------------------------------------------------------------------------

class PercentLine:
    """``<label> NN%`` redrawn in place on a TTY (at most every 100 ms); plain lines otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.tty = console.stderr_is_tty()
        self._last_draw = 0.0
        self._last_pct = -1
        if not self.tty:
            console.info(f"{label}...")

    def update(self, fraction: float) -> None:
        pct = int(fraction * 100)
        now = time.monotonic()
        if not self.tty or pct == self._last_pct or (now - self._last_draw < 0.1 and pct < 100):
            return
        self._last_pct, self._last_draw = pct, now
        sys.stderr.write(f"\r\x1b[2K{self.label} {pct}%")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\r\x1b[2K")
            sys.stderr.flush()


# -- chat -------------------------------------------------------------------------------------

def stats_lines(stats: Any) -> list[str]:
    """lms's stats block (``lms chat --stats``), plus the cached prompt tokens."""
    lines = ["", "", "Prediction Stats:", f"  Stop Reason: {stats.stop_reason}"]
    if stats.tokens_per_second is not None:
        lines.append(f"  Tokens/Second: {stats.tokens_per_second:.2f}")
    if stats.time_to_first_token_sec is not None:
        lines.append(f"  Time to First Token: {stats.time_to_first_token_sec:.3f}s")
    if stats.prompt_tokens_count is not None:
        lines.append(f"  Prompt Tokens: {stats.prompt_tokens_count}")
        if stats.cached_prompt_tokens_count:
            lines.append(f"  Cached Prompt Tokens: {stats.cached_prompt_tokens_count}")
    if stats.predicted_tokens_count is not None:
        lines.append(f"  Predicted Tokens: {stats.predicted_tokens_count}")
    if stats.total_tokens_count is not None:
        lines.append(f"  Total Tokens: {stats.total_tokens_count}")
    return lines


def stats_summary(stats: Any) -> str:
    """One dim line under a reply in the REPL."""
    parts = []
    if stats.tokens_per_second is not None:
        parts.append(f"{stats.tokens_per_second:.1f} tok/s")
    if stats.time_to_first_token_sec is not None:
        parts.append(f"first token {stats.time_to_first_token_sec:.2f}s")
    parts.append(f"prompt {stats.prompt_tokens_count} "
                 f"({stats.cached_prompt_tokens_count or 0} cached)")
    parts.append(f"predicted {stats.predicted_tokens_count}")
    parts.append(f"stop: {stats.stop_reason}")
    return " · ".join(parts)


def split_reasoning(text: str) -> tuple[str, str, bool]:
    """(reasoning, answer, still_thinking) from text that may start with <think>…</think>."""
    stripped = text.lstrip()
    if not stripped.startswith("<think>"):
        return "", text, False
    body = stripped[len("<think>"):]
    if "</think>" not in body:
        return body, "", True
    reasoning, answer = body.split("</think>", 1)
    return reasoning, answer.lstrip("\n"), False


def stable_prefix(markdown: str) -> int:
    """Where the finished blocks of streaming markdown end: the last blank line outside a
    code fence. Text before it will not change its rendering any more."""
    cut, in_fence = 0, False
    pos = 0
    for line in markdown.splitlines(keepends=True):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        pos += len(line)
        if not in_fence and not line.strip() and pos < len(markdown):
            cut = pos
    return cut


class ReplyView:
    """One streamed reply: progress bar, then a spinner, then markdown that grows in place.

    Finished markdown blocks are printed for good as they complete, so that a long reply
    scrolls normally; only the block being written is redrawn.
    """

    def __init__(self, console: Any) -> None:
        from rich.live import Live

        self.console = console
        self.text = ""
        self._printed = 0  # characters of the answer already printed for good
        self._reasoning_printed = False
        self._progress: float | None = None
        self._live = Live(self._status(), console=console, refresh_per_second=12,
                          transient=True)
        self._live.start()

    def _status(self) -> Any:
        from rich.spinner import Spinner

        if self._progress is not None and 0 < self._progress < 1:
            from rich.progress_bar import ProgressBar
            from rich.table import Table

            grid = Table.grid(padding=(0, 1))
            grid.add_row("Processing prompt", ProgressBar(total=1.0, completed=self._progress,
                                                          width=30),
                         f"{self._progress * 100:.0f}%")
            return grid
        return Spinner("dots", text="Thinking…", style="dim")

    def progress(self, value: float) -> None:
        self._progress = value
        if not self.text:
            self._live.update(self._status())

    def add(self, fragment: str) -> None:
        self.text += fragment
        reasoning, answer, thinking = split_reasoning(self.text)
        if thinking:
            self._live.update(self._reasoning(reasoning))
            return
        if reasoning and not self._reasoning_printed:
            self._live.console.print(self._reasoning(reasoning))
            self._reasoning_printed = True
        self._show(answer)

    def _show(self, answer: str) -> None:
        from rich.markdown import Markdown

        pending = answer[self._printed:]
        cut = stable_prefix(pending)
        if cut:
            self._live.console.print(Markdown(pending[:cut]))
            self._printed += cut
            pending = pending[cut:]
        self._live.update(Markdown(pending) if pending.strip() else self._status())

    @staticmethod
    def _reasoning(text: str) -> Any:
        from rich.text import Text

        return Text(text.strip(), style="dim italic")

    def finish(self) -> None:
        from rich.markdown import Markdown

        _, answer, thinking = split_reasoning(self.text)
        rest = answer[self._printed:] if not thinking else ""
        self._live.stop()
        if thinking:
            self.console.print(self._reasoning(split_reasoning(self.text)[0]))
        if rest.strip():
            self.console.print(Markdown(rest))


# -- act --------------------------------------------------------------------------------------

def shorten(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ActView:
    """Shows an agent's rounds: headers, streamed text (stdout), tool calls and results with
    their times (stderr), a summary. With ``json_mode``, one JSON event per line instead."""

    def __init__(self, json_mode: bool) -> None:
        self.json_mode = json_mode
        self.round = 0
        self.at_line_start = True
        self.timings: list[tuple[str, float]] = []
        self.prompt_tokens = self.predicted_tokens = 0
        self.final_text = ""

    def emit(self, event: dict[str, Any]) -> None:
        print_json(event)

    def start(self, identifier: str, task: str, tools: list[str]) -> None:
        if self.json_mode:
            self.emit({"type": "start", "model": identifier, "task": task, "tools": tools})
        else:
            console.err.print(f"[dim]Agent: {identifier} · tools: {', '.join(tools)}[/dim]")

    def timed(self, fn: Any) -> Any:
        import functools

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.timings.append((fn.__name__, time.perf_counter() - started))

        return run

    def callbacks(self) -> dict[str, Any]:
        return {"on_round_start": self.round_start, "on_prediction_fragment": self.fragment,
                "on_message": self.message, "on_prediction_completed": self.completed}

    def round_start(self, index: int) -> None:
        self.round = index
        if self.json_mode:
            self.emit({"type": "round_start", "round": index})
        else:
            self.pause()
            console.err.rule(f"Round {index + 1}", style="dim")

    def fragment(self, fragment: Any, index: int) -> None:
        if self.json_mode:
            self.emit({"type": "fragment", "round": index, "content": fragment.content})
            return
        sys.stdout.write(fragment.content)
        sys.stdout.flush()
        if fragment.content:
            self.at_line_start = fragment.content.endswith("\n")

    def pause(self) -> None:
        """End a half-written line before printing anything else."""
        if not self.at_line_start:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.at_line_start = True

    def message(self, message: Any) -> None:
        for part in message.content:
            if part.get("type") == "toolCallRequest":
                self.tool_call(part["toolCallRequest"])
            elif part.get("type") == "toolCallResult":
                self.tool_result(part)

    def tool_call(self, request: dict[str, Any]) -> None:
        if self.json_mode:
            self.emit({"type": "tool_call", "round": self.round, "id": request.get("id"),
                       "name": request.get("name"), "arguments": request.get("arguments")})
            return
        self.pause()
        args = json.dumps(request.get("arguments") or {}, ensure_ascii=False)
        console.err.print(f"[key]→ {request.get('name')}[/key]({shorten(args, 300)})",
                          highlight=False)

    def tool_result(self, part: dict[str, Any]) -> None:
        name, seconds = self.timings.pop(0) if self.timings else ("?", 0.0)
        if self.json_mode:
            self.emit({"type": "tool_result", "round": self.round, "id": part.get("toolCallId"),
                       "name": name, "content": part.get("content"), "seconds": seconds})
            return
        console.err.print(f"[ok]←[/ok] {shorten(str(part.get('content')))} "
                          f"[dim]({elapsed(seconds)})[/dim]", highlight=False)

    def completed(self, result: Any) -> None:
        self.prompt_tokens += result.stats.prompt_tokens_count or 0
        self.predicted_tokens += result.stats.predicted_tokens_count or 0
        self.final_text = result.content
        if self.json_mode:
            self.emit({"type": "round_end", "round": result.round_index,
                       "stop_reason": result.stats.stop_reason,
                       "predicted_tokens": result.stats.predicted_tokens_count})

    def stopped(self) -> None:
        if self.json_mode:
            self.emit({"type": "stopped", "round": self.round})
        else:
            self.pause()
            console.err.print("[warn]Stopped by the user.[/warn]")

    def finish(self, result: Any) -> None:
        if self.json_mode:
            self.emit({"type": "final", "content": self.final_text, "rounds": result.rounds,
                       "total_time_seconds": result.total_time_seconds,
                       "prompt_tokens": self.prompt_tokens,
                       "predicted_tokens": self.predicted_tokens})
            return
        self.pause()
        rounds = "round" if result.rounds == 1 else "rounds"
        console.err.print(f"[dim]Done: {result.rounds} {rounds} in "
                          f"{elapsed(result.total_time_seconds)} · {self.prompt_tokens} prompt "
                          f"+ {self.predicted_tokens} predicted tokens[/dim]")
