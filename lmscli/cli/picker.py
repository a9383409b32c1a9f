"""The interactive model picker (stderr), only ever shown on a TTY."""

from __future__ import annotations

from lmscli.catalog import fuzzy_filter
from lmscli.errors import CancelledError


def pick(message: str, keys: list[str], sizes: dict[str, str], initial: str = "") -> str:
    """Type to filter, arrows to move, Enter to choose; Ctrl+C cancels."""
    import sys

    from prompt_toolkit import prompt
    from prompt_toolkit.completion import Completer, Completion
    from prompt_toolkit.output import create_output

    class Fuzzy(Completer):
        def get_completions(self, document, complete_event):  # type: ignore[no-untyped-def]
            for key, _score in fuzzy_filter(document.text, keys):
                yield Completion(key, start_position=-len(document.text),
                                 display_meta=sizes.get(key, ""))

    try:
        answer = prompt(f"{message} | ", completer=Fuzzy(), complete_while_typing=True,
                        default=initial, pre_run=_open_menu,
                        output=create_output(stdout=sys.stderr))
    except (KeyboardInterrupt, EOFError) as exc:
        raise CancelledError("Cancelled.") from exc
    matches = fuzzy_filter(answer.strip(), keys)
    exact = [k for k in keys if k == answer.strip()]
    if exact:
        return exact[0]
    if not matches:
        raise CancelledError(f"No model matches {answer.strip()!r}.")
    return matches[0][0]


def _open_menu() -> None:
    from prompt_toolkit.application.current import get_app

    get_app().current_buffer.start_completion(select_first=False)
