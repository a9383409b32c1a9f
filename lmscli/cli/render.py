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

def models_table(models: list[dict[str, Any]], loaded_counts: dict[str, int],
                 linked: list[dict[str, Any]] | None = None) -> None:
    """``lms ls``: the models on disk, then (with the LLMs) those linked engines serve."""
    linked = linked or []
    total = sum(m["sizeBytes"] for m in models)
    noun = "model" if len(models) == 1 else "models"
    console.out.print(f"\nYou have {len(models)} {noun}, taking up {size_1000(total)} of disk "
                      "space.\n", markup=False)
    for kind, title in (("llm", "LLM"), ("embedding", "EMBEDDING")):
        group = sorted((m for m in models if m["type"] == kind), key=lambda m: m["modelKey"])
        links = [m for m in linked if m["type"] == kind]
        if not group and not links:
            continue
        rows = [[title, "PARAMS", "ARCH", "SIZE", "DEVICE"]]
        marks = []
        for m in group:
            rows.append([m["modelKey"], m.get("paramsString") or "",
                         arch_name(m.get("architecture")), size_1000(m["sizeBytes"]), "Local"])
            n = loaded_counts.get(m["modelKey"], 0)
            marks.append("" if not n else "✓ LOADED" if n == 1 else f"✓ LOADED ({n})")
        for m in links:
            rows.append([m["identifier"], "", "", "-", m["device"]])
            marks.append("✓ LINKED" if m["status"] != "unreachable" else "")
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
        status = str(m["status"]).upper()
        if m.get("queued"):  # beyond lms: the requests waiting for a slot
            status += f" ({m['queued']} QUEUED)"
        linked = m.get("format") == "linked"
        rows.append([m["identifier"], m["modelKey"], status,
                     "-" if linked else size_1000(m["sizeBytes"]),
                     str(m["contextLength"] or "-"), str(m.get("parallel") or "-"),
                     m.get("device") or "Local", ttl])
    table(rows)


# -- link ls ----------------------------------------------------------------------------------

def links_table(links: list[dict[str, Any]]) -> None:
    rows = [["NAME", "URL", "STATUS", "MODELS"]]
    for link in links:
        status = {True: "reachable", False: "unreachable"}.get(link["reachable"], "unchecked")
        models = link["models"]
        shown = ", ".join(models[:3]) + (f" (+{len(models) - 3} more)" if len(models) > 3
                                         else "")
        rows.append([link["name"], link["url"], status, shown or "-"])
    table(rows)
    for link in links:
        if link["error"]:
            console.out.print(f"\n{link['name']}: {link['error']}", markup=False)


def mcp_table(servers: list[dict[str, Any]]) -> None:
    """MCP servers and their tools; a tool that may change something is marked (asks)."""
    rows = [["NAME", "TYPE", "RUNS", "TOOLS"]]
    for server in servers:
        tools = ", ".join(t["name"] + (" (asks)" if t["writes"] else "")
                          for t in server["tools"])
        rows.append([server["name"], server["type"], server["target"],
                     tools or ("does not start" if server["error"] else "-")])
    table(rows)
    for server in servers:
        if server["error"]:
            console.out.print(f"\n{server['name']}: {server['error']}", markup=False)


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
    if stats.used_draft_model_key:
        lines.append(f"  Draft Model: {stats.used_draft_model_key}")
    if stats.total_draft_tokens_count:
        share = stats.accepted_draft_tokens_count / stats.total_draft_tokens_count
        lines.append(f"  Accepted Draft Tokens: {stats.accepted_draft_tokens_count} of "
                     f"{stats.total_draft_tokens_count} ({share:.0%})")
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
