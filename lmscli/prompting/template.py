"""Chat templates from GGUF files, rendered in a sandbox: a template is untrusted input."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

# Used when a GGUF carries no template: ChatML is what most small instruct models expect.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# No operator in a template may build a value larger than this (a prompt is far smaller).
MAX_VALUE_CHARS = 16_000_000
MAX_EXPONENT = 1000

# A render still going after GRACE_S is no ordinary template (those take milliseconds). From
# then on it pauses for PAUSE_S every PAUSE_EVERY_S: renders share the interpreter (the GIL)
# with the server, whose threads would otherwise wait up to the 5 ms switch interval each
# time they need it back, and a healthy model's request needs it many times.
GRACE_S = 0.05
PAUSE_EVERY_S = 0.004
PAUSE_S = 0.001


class TemplateRenderError(ValueError):
    """The model's chat template could not render these messages."""


class TemplateTimeout(TemplateRenderError):
    """The template ran past its time budget (it loops, or nearly)."""


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False, separators: Any = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, plus bounds on the operators that can build huge values in one step."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is too large")
        if _size(left, right, operator) > MAX_VALUE_CHARS:
            raise SecurityError(f"the result of {operator!r} would be too large")
        return super().call_binop(context, operator, left, right)


def _size(left: Any, right: Any, operator: str) -> int:
    """The length of the string or list ``left <operator> right`` would give, else 0."""
    sized = (str, list, tuple)
    if operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        return len(left) + len(right)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int):
                return len(seq) * n
    return 0


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(template: str | None, messages: list[dict[str, Any]], *,
                bos_token: str = "", eos_token: str = "", add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, time_budget_s: float | None = None,
                **extra: Any) -> str:
    """Messages (OpenAI shape, content already text) → the exact prompt text.

    With ``time_budget_s`` the template stops with TemplateTimeout once it has used that much
    of its own CPU time.
    """
    try:
        compiled = _compile(template or CHATML)
        with _cpu_budget(time_budget_s):
            return compiled.render(
                messages=messages, bos_token=bos_token, eos_token=eos_token,
                add_generation_prompt=add_generation_prompt, tools=tools, **extra,
            )
    except TemplateRenderError:
        raise
    except TemplateError as exc:
        raise TemplateRenderError(f"The model's chat template failed: {exc}") from exc
    except Exception as exc:  # a template is foreign code: any failure is the template's
        raise TemplateRenderError(f"The model's chat template failed: {exc}") from exc


@contextmanager
def _cpu_budget(seconds: float | None) -> Iterator[None]:
    """Interrupt template code once this thread has used ``seconds`` of CPU time rendering.

    A trace function sees every line of the Python a template compiles to (its frames come
    from "<template>"), so a loop that never calls out can still be stopped; other code runs
    untraced. The budget is the thread's own CPU time, not wall time: time spent waiting for
    the interpreter while other renders loop must not count against a healthy template.
    """
    if seconds is None:
        yield
        return
    started, cpu_started = time.monotonic(), time.thread_time()
    # the CPU clock costs ten times the wall clock to read: it is read only at the pauses
    # (or when a budget below the grace could be spent, since CPU time never outruns wall time)
    next_check = started + min(GRACE_S, seconds)

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        nonlocal next_check
        if time.monotonic() < next_check:
            return on_line
        if time.thread_time() - cpu_started > seconds:
            raise TemplateTimeout(f"The model's chat template ran for more than {seconds:g} s "
                                  "and was stopped.")
        time.sleep(PAUSE_S)
        next_check = time.monotonic() + PAUSE_EVERY_S
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)
