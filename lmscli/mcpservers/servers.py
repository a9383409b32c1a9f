"""MCP servers as tool sources: each session runs on an event loop thread of its own, and its
tools are plain callables that block until their call returns, so that ``act()`` runs them
like any Python tool. A tool carries its JSON schema (``lms_parameters``) and whether it may
change something (``lms_writes``: MCP's ``readOnlyHint`` not true, or ``destructiveHint``),
which ``lms act`` asks about before it runs.

Failures are one line: a server that doesn't start or answer in time, that crashes or that
returns an error gives the model an error result and the user an ``McpError``; nothing hangs,
and closing a session (or lmscli exiting) ends its child process.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from lmscli import paths
from lmscli.errors import LMSError
from lmscli.mcpservers.config import ServerSpec

START_TIMEOUT_S = 30.0
CALL_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 10.0
MAX_RESULT_CHARS = 50_000

_open_servers: set[McpServer] = set()


class McpError(LMSError):
    """An MCP server that could not start or answer."""


class McpServer:
    """One server's session: ``start`` connects and lists its tools, ``call`` runs one,
    ``close`` ends the session (and a stdio server's process). Usable as a context manager."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.tools: list[Any] = []  # the SDK's Tool listings
        self._client: Any = None
        # a session's own loop and thread, made by each start: a closed server can start
        # again (lms.mcp("NAME") given to act() twice)
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._stop: asyncio.Event | None = None
        self._session: concurrent.futures.Future[None] | None = None
        self._ready = threading.Event()  # the session is up, or failed to come up
        self._start_error: BaseException | None = None

    def __enter__(self) -> McpServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the session ------------------------------------------------------------------------

    def start(self) -> McpServer:
        if self.lms_running:
            return self
        if self._thread is not None:  # it ran before and was closed
            self._loop = asyncio.new_event_loop()
        self._ready, self._start_error = threading.Event(), None
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"mcp-{self.name}")
        self._thread.start()
        _open_servers.add(self)
        self._session = asyncio.run_coroutine_threadsafe(self._serve(), self._loop)
        failure = None
        if not self._ready.wait(START_TIMEOUT_S):
            failure = f"no answer within {START_TIMEOUT_S:g} s"
        elif self._start_error is not None:
            failure = one_line(self._start_error)
        if failure is not None:
            self.close()
            where = f"; its log: {log_file(self.name)}" if self.spec.command else ""
            raise McpError(f"MCP server {self.name} did not start: {failure}",
                           hint=f"It runs: {self.spec.target()}{where}")
        return self

    async def _serve(self) -> None:
        """The session's one task: the SDK's transports must open and close in the same
        task. Opens, lists the tools, then holds the session until ``close``."""
        import mcp

        self._stop = asyncio.Event()
        transports = [self._transport()]
        if self.spec.url:  # an older server speaks MCP over SSE only
            transports.append(_SseTransport(self.spec))
        try:
            for transport in transports:
                try:
                    async with mcp.Client(transport, read_timeout_seconds=CALL_TIMEOUT_S,
                                          raise_exceptions=False) as client:
                        self._client = client
                        self.tools = await list_all(client)
                        self._start_error = None  # an earlier transport's failure
                        self._ready.set()
                        await self._stop.wait()
                        return
                except Exception as exc:
                    if self._ready.is_set():
                        return  # it ran, then ended: calls now say it is not running
                    self._start_error = self._start_error or exc
        finally:
            self._client = None
            self._ready.set()

    def _transport(self) -> Any:
        spec = self.spec
        if spec.command:
            return _StdioTransport(spec)
        if not spec.headers:
            return spec.url
        return _HttpTransport(spec)

    def call(self, tool: str, arguments: dict[str, Any]) -> str:
        """The tool's result as text for the model; an error result starts with "Error"."""
        if self._client is None:
            raise McpError(f"MCP server {self.name} is not running.")
        client = self._client
        result = self._wait(client.call_tool(tool, arguments), CALL_TIMEOUT_S + 5)
        text = result_text(result.content)
        if result.is_error:
            return f"Error from {self.name}.{tool}: {text or 'no message'}"
        return text

    def close(self) -> None:
        _open_servers.discard(self)
        if self._session is not None and self._stop is not None and not self._session.done():
            self._loop.call_soon_threadsafe(self._stop.set)
            with contextlib.suppress(Exception):
                self._session.result(timeout=CLOSE_TIMEOUT_S)
        if self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=CLOSE_TIMEOUT_S)
            if not self._thread.is_alive():
                self._loop.close()

    def _wait(self, work: Any, timeout: float) -> Any:
        """Run ``work`` on the session's loop and wait for it; any failure is one line."""
        future = asyncio.run_coroutine_threadsafe(work, self._loop)
        try:
            return future.result(timeout=timeout)
        except (TimeoutError, concurrent.futures.TimeoutError):
            future.cancel()
            raise McpError(f"no answer from MCP server {self.name} within {timeout:g} s") \
                from None
        except Exception as exc:
            raise McpError(f"MCP server {self.name}: {one_line(exc)}") from None

    # -- its tools as lmscli tools ----------------------------------------------------------

    @property
    def lms_running(self) -> bool:
        return self._session is not None and not self._session.done()

    def lms_tools(self, taken: Iterable[str] = ()) -> list[Callable[..., str]]:
        """What ``act()`` asks of a tool source in its tools list: started if need be."""
        return self.start().callables(taken)

    def callables(self, taken: Iterable[str] = ()) -> list[Callable[..., str]]:
        """The server's tools as callables for ``act()``; a name already ``taken`` (by
        another server or a built-in tool) gets the server's name in front."""
        used = set(taken)
        out = []
        for tool in self.tools:
            name = tool.name if tool.name not in used else f"{self.name}_{tool.name}"
            used.add(name)
            out.append(self._callable(tool, name))
        return out

    def _callable(self, tool: Any, name: str) -> Callable[..., str]:
        def run(**arguments: Any) -> str:
            try:
                return self.call(tool.name, arguments)
            except McpError as exc:  # the model hears it and may try otherwise
                return f"Error: {exc.message}"

        run.__name__ = run.__qualname__ = name
        run.__doc__ = tool.description or f"The {tool.name} tool of MCP server {self.name}."
        run.lms_parameters = plain_schema(  # type: ignore[attr-defined]
            tool.input_schema or {"type": "object", "properties": {}})
        run.lms_writes = writes(tool)  # type: ignore[attr-defined]
        run.lms_text_result = True  # type: ignore[attr-defined]
        run.lms_source_tool = tool.name  # type: ignore[attr-defined]  (before any renaming)
        return run


class _Transport:
    """The streams of one connection, opened on entry and closed on exit, as the SDK's
    ``Client`` takes a transport. Subclasses say how they open (``_open``)."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> Any:
        return await self._open(self._stack)

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        raise NotImplementedError


class _StdioTransport(_Transport):
    """A stdio server's process, with this environment plus what mcp.json gives it; what it
    writes on stderr goes to its log (``.internal/mcp-NAME.log``), not over the terminal."""

    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        import mcp
        from mcp.client.stdio import stdio_client

        log = log_file(self.spec.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        errlog = stack.enter_context(open(log, "a", encoding="utf-8"))  # noqa: SIM115
        params = mcp.StdioServerParameters(command=self.spec.command or "",
                                           args=self.spec.args,
                                           env={**os.environ, **self.spec.env})
        return await stack.enter_async_context(stdio_client(params, errlog=errlog))


class _HttpTransport(_Transport):
    """A Streamable HTTP connection with the headers mcp.json gives (a key, usually)."""

    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        import httpx2
        from mcp.client.streamable_http import streamable_http_client

        client = await stack.enter_async_context(httpx2.AsyncClient(headers=self.spec.headers))
        return await stack.enter_async_context(streamable_http_client(self.spec.url or "",
                                                                      http_client=client))


class _SseTransport(_Transport):
    """The older HTTP+SSE transport, tried when Streamable HTTP fails."""

    async def _open(self, stack: contextlib.AsyncExitStack) -> Any:
        from mcp.client.sse import sse_client

        return await stack.enter_async_context(sse_client(self.spec.url or "",
                                                          headers=self.spec.headers))


def log_file(name: str) -> Path:
    return paths.internal_dir() / f"mcp-{name}.log"


async def list_all(client: Any) -> list[Any]:
    tools, cursor = [], None
    while True:
        page = await client.list_tools(cursor=cursor)
        tools += page.tools
        cursor = page.next_cursor
        if not cursor:
            return tools


def plain_schema(schema: Any) -> Any:
    """A JSON schema without the ``title`` keywords that SDKs generate ("addArguments",
    "A"): they say nothing the names don't, and small models copy them into their calls."""
    if isinstance(schema, list):
        return [plain_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key == "title" and isinstance(value, str):
            continue
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: plain_schema(sub) for name, sub in value.items()}
        else:
            out[key] = plain_schema(value)
    return out


def writes(tool: Any) -> bool:
    """Whether a tool may change something: MCP's hints say so unless it is read-only."""
    hints = tool.annotations
    if hints is None:
        return True
    return not hints.read_only_hint or bool(hints.destructive_hint)


def result_text(content: list[Any]) -> str:
    parts = []
    for block in content:
        if getattr(block, "type", None) == "text":
            parts.append(block.text)
        else:
            parts.append(f"[{getattr(block, 'type', 'content')} content, not shown]")
    text = "\n".join(parts)
    if len(text) > MAX_RESULT_CHARS:
        return text[:MAX_RESULT_CHARS] + f"\n[... cut: {len(text)} characters in all]"
    return text


def one_line(exc: BaseException) -> str:
    """An exception (or an exception group from the SDK's task groups) in one line."""
    while getattr(exc, "exceptions", None):  # a group from the SDK's task groups
        exc = exc.exceptions[0]  # type: ignore[attr-defined]
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def start_all(specs: list[ServerSpec]) -> list[McpServer]:
    """Every server started, or none: one that fails closes those already running."""
    started: list[McpServer] = []
    try:
        for spec in specs:
            started.append(McpServer(spec).start())
    except BaseException:
        close_all(started)
        raise
    return started


def close_all(servers: Iterable[McpServer]) -> None:
    for server in list(servers):
        server.close()


# child processes never outlive lmscli, even when a caller forgot to close
atexit.register(lambda: close_all(_open_servers))
