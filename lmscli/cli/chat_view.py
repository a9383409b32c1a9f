"""How ``lms chat`` shows a reply: reasoning dimmed, markdown that grows as it streams."""

from __future__ import annotations

from typing import Any


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


def chat_markdown(text: str) -> Any:
    """Markdown that keeps the model's single line breaks, as chat UIs do: a poem or an
    address stays on its lines, where plain markdown would join them into one paragraph."""
    from rich.markdown import Markdown

    markdown = Markdown(text)
    for token in markdown.parsed:
        for child in token.children or ():  # inline children are never nested further
            if child.type == "softbreak":
                child.type = "hardbreak"
    return markdown


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
        pending = answer[self._printed:]
        cut = stable_prefix(pending)
        if cut:
            self._live.console.print(chat_markdown(pending[:cut]))
            self._printed += cut
            pending = pending[cut:]
        self._live.update(chat_markdown(pending) if pending.strip() else self._status())

    @staticmethod
    def _reasoning(text: str) -> Any:
        from rich.text import Text

        return Text(text.strip(), style="dim italic")

    def finish(self) -> None:
        _, answer, thinking = split_reasoning(self.text)
        rest = answer[self._printed:] if not thinking else ""
        self._live.stop()
        if thinking:
            self.console.print(self._reasoning(split_reasoning(self.text)[0]))
        if rest.strip():
            self.console.print(chat_markdown(rest))
