"""Pure functions from messages (+ template, + tools) to prompt text, and back."""

from lmscli.prompting.template import CHATML, TemplateRenderError, render_chat

__all__ = ["CHATML", "TemplateRenderError", "render_chat"]
