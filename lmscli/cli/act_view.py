"""How ``lms act`` shows an agent's rounds: text, tool calls and results, or JSON lines."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from lmscli.cli import console
from lmscli.cli.render import elapsed, print_json


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
