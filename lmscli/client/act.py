"""``LLM.act``: rounds of prediction and tool calls until the model answers without tools."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

from lmscli.client.history import AssistantResponse, Chat, ToolResultMessage
from lmscli.client.prediction import Callbacks, PredictionStream, safe_call
from lmscli.client.results import ActResult, PredictionRoundResult
from lmscli.client.tools import ArgumentError, ToolDef, convert_arguments, tool_def
from lmscli.errors import PredictionError, UserInputError

InvalidHandler = Callable[[Exception, "dict[str, Any] | None"], "str | None"]


class ChatModel(Protocol):
    """What the loop needs of a model: one streamed chat round with tools offered. ``LLM`` is
    one; naming it would put this module above the handles, which build on it."""

    def stream_chat(self, chat: Chat, *, callbacks: Callbacks, response_format: Any = None,
                    config: Mapping[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None,
                    tool_choice: Any = None) -> PredictionStream: ...


def expand(tools: Iterable[Any], started: list[Any]) -> list[Any]:
    """The tools, with each tool source (an object with ``lms_tools``, such as
    ``lms.mcp("NAME")``) replaced by its tools, named apart from those before it. Sources
    that were not running are added to ``started``: act() ends what it started."""
    out: list[Any] = []
    for tool in tools:
        if hasattr(tool, "lms_tools"):
            if not getattr(tool, "lms_running", True):
                started.append(tool)
            out += tool.lms_tools([tool_def(t).name for t in out])
        else:
            out.append(tool)
    return out


class ActLoop:
    def __init__(self, model: ChatModel, chat: Any, tools: Iterable[Any], *,
                 max_prediction_rounds: int | None, max_parallel_tool_calls: int | None,
                 config: Mapping[str, Any] | None, tool_choice: Any,
                 callbacks: dict[str, Any]) -> None:
        if max_prediction_rounds is not None and max_prediction_rounds < 1:
            raise UserInputError("max_prediction_rounds must be at least 1.")
        self.model = model
        self.chat = Chat.from_history(chat)  # the caller's chat changes only via on_message
        self.tools = {}
        self.started: list[Any] = []  # tool sources to close when the loop ends
        try:
            self._add_tools(tools)
        except BaseException:
            self._close_started()
            raise
        self.max_rounds = max_prediction_rounds
        self.workers = max_parallel_tool_calls
        self.config = config
        self.tool_choice = tool_choice
        self.cb = callbacks

    def call(self, name: str, *args: Any) -> None:
        safe_call(name, self.cb.get(name), *args)

    def _add_tools(self, tools: Iterable[Any]) -> None:
        for tool in map(tool_def, expand(tools, self.started)):
            if tool.name in self.tools:
                raise UserInputError(f"Duplicate tool name: {tool.name}")
            self.tools[tool.name] = tool
        if not self.tools:
            raise UserInputError("act() needs at least one tool.")

    def _close_started(self) -> None:
        for source in self.started:
            source.close()

    def run(self) -> ActResult:
        try:
            return self._rounds()
        finally:
            self._close_started()

    def _rounds(self) -> ActResult:
        started = time.perf_counter()
        round_index = 0
        while True:
            final = self.max_rounds is not None and round_index == self.max_rounds - 1
            self.call("on_round_start", round_index)
            requests = self._predict(round_index, final)
            if requests:
                self._run_tools(requests)
            self.call("on_round_end", round_index)
            if not requests:
                return ActResult(round_index + 1, time.perf_counter() - started)
            round_index += 1

    def _predict(self, round_index: int, final: bool) -> list[dict[str, Any]]:
        callbacks = Callbacks(None, self.cb.get("on_first_token"),
                              self.cb.get("on_prediction_fragment"),
                              self.cb.get("on_prompt_processing_progress"), round_index)
        tools = None if final else [t.openai() for t in self.tools.values()]
        # a forced choice applies to the first round; later rounds decide for themselves
        choice = self.tool_choice if round_index == 0 and not final else None
        stream = self.model.stream_chat(self.chat, tools=tools, tool_choice=choice,
                                         config=self.config, callbacks=callbacks)
        with stream:
            result = stream.wait_for_result()
            requests = stream.tool_calls
        self.call("on_prediction_completed", PredictionRoundResult(
            result.content, result.parsed, result.structured, result.stats,
            result.model_info, round_index))
        if final and requests:
            self._fatal("Model requested tool use on final prediction round.")
        message = AssistantResponse(
            [{"type": "text", "text": result.content}]
            + [{"type": "toolCallRequest", "toolCallRequest": r} for r in requests])
        self.chat.append(message)
        self.call("on_message", message)
        return requests

    def _fatal(self, text: str) -> None:
        exc = PredictionError(text)
        handler = self.cb.get("handle_invalid_tool_request")
        if handler is not None:
            handler(exc, None)  # a notification; it may raise its own exception instead
        raise exc

    def _run_tools(self, requests: list[dict[str, Any]]) -> None:
        with ThreadPoolExecutor(self.workers) as pool:
            contents = list(pool.map(self._run_one, requests))
        message = ToolResultMessage([
            {"type": "toolCallResult", "content": content, "toolCallId": request.get("id")}
            for request, content in zip(requests, contents, strict=True)])
        self.chat.append(message)
        self.call("on_message", message)

    def _run_one(self, request: dict[str, Any]) -> str:
        """The text the model gets back: the JSON of the result, or what went wrong."""
        tool = self.tools.get(request.get("name", ""))
        if tool is None:
            return self._invalid(f"Cannot find tool with name {request.get('name')}.",
                                 request)
        try:
            kwargs = convert_arguments(tool, request.get("arguments") or {})
        except ArgumentError as exc:
            return self._invalid(f"Failed to parse arguments for tool {tool.name}: {exc}",
                                 request)
        return self._call_tool(tool, kwargs, request)

    def _call_tool(self, tool: ToolDef, kwargs: dict[str, Any],
                   request: dict[str, Any]) -> str:
        try:
            result = tool.implementation(**kwargs)
        except Exception as exc:  # the model hears about the failure and may try again
            text = self._invalid(f"Unhandled Python exception: {exc!r}", request)
            return json.dumps(text, ensure_ascii=False)
        if isinstance(result, str) and getattr(tool.implementation, "lms_text_result", False):
            return result  # already the text for the model (an MCP server's result)
        return json.dumps(result, ensure_ascii=False, default=str)

    def _invalid(self, text: str, request: dict[str, Any]) -> str:
        handler = self.cb.get("handle_invalid_tool_request")
        if handler is None:
            return text
        replacement = handler(PredictionError(text), request)  # may raise: that aborts act()
        return text if replacement is None else replacement
