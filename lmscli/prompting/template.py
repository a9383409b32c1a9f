"""Chat templates from GGUF files, rendered in a sandbox: a template is untrusted input."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# Used when a GGUF carries no template: ChatML is what most small instruct models expect.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateRenderError(ValueError):
    """The model's chat template could not render these messages."""


def _raise_exception(message: str) -> None:
    raise TemplateRenderError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False,
            sort_keys: bool = False, separators: Any = None) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys,
                      separators=separators)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(source: str) -> Any:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def render_chat(template: str | None, messages: list[dict[str, Any]], *,
                bos_token: str = "", eos_token: str = "", add_generation_prompt: bool = True,
                tools: list[dict[str, Any]] | None = None, **extra: Any) -> str:
    """Messages (OpenAI shape, content already text) → the exact prompt text."""
    try:
        compiled = _compile(template or CHATML)
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
