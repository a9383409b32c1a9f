"""The interactive chat: prompt-toolkit input, rich output, slash commands, Ctrl+C per turn."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings

from lmscli import catalog, paths
from lmscli.cli import chat_view, render, steps
from lmscli.cli import console as cli_console
from lmscli.cli.tooling import TOOL_ROUNDS
from lmscli.client import Chat
from lmscli.errors import LMSError

# /set names → SDK config keys and value types
SETTINGS: dict[str, tuple[str, type]] = {
    "temperature": ("temperature", float), "max-tokens": ("maxTokens", int),
    "top-p": ("topPSampling", float), "top-k": ("topKSampling", int),
    "min-p": ("minPSampling", float), "repeat-penalty": ("repeatPenalty", float),
    "seed": ("seed", int),
}
PASS_THROUGH = ("/think", "/no_think")  # sent to the model as text, as lms does


class ChatSession:
    """One conversation with one model (switchable with /model)."""

    def __init__(self, model: Any, *, system_prompt: str, show_stats: bool = False,
                 ttl: int = 3600, session: PromptSession | None = None,
                 console: Any = None, load_model: Callable[[str], Any] | None = None,
                 tools: list[Callable[..., Any]] | None = None, tool_view: Any = None) -> None:
        self.model = model
        self.tools = tools or []  # an MCP server's (lms chat --mcp): replies may call them
        self.tool_view = tool_view  # shows each call and its result (act_view.ActView)
        self.chat = Chat(system_prompt)
        self.system_prompt = system_prompt
        self.show_stats = show_stats
        self.ttl = ttl
        self.config: dict[str, Any] = {}
        self.last_stats: Any = None
        self.console = console or cli_console.terminal()
        self._load_model = load_model
        self.commands: dict[str, tuple[str, Callable[[str], bool]]] = {
            "/help": ("Show help information", self.cmd_help),
            "/?": ("Show help information", self.cmd_help),
            "/exit": ("Exit the chat", lambda _: False),
            "/bye": ("Exit the chat", lambda _: False),
            "/model": ("Switch model (type /model to see the list)", self.cmd_model),
            "/clear": ("Clear the chat history", self.cmd_clear),
            "/system-prompt": ("Replace the system prompt", self.cmd_system_prompt),
            "/stats": ("Show stats of the previous generation", self.cmd_stats),
            "/set": ("Set a sampling parameter, e.g. /set temperature 0.2", self.cmd_set),
            "/show": ("Show the model and the settings", self.cmd_show),
            "/retry": ("Generate the last answer again", self.cmd_retry),
        }
        self.session = session or make_session(self.commands, SETTINGS)

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> int:
        self.welcome()
        while True:
            try:
                line = self.session.prompt(FormattedText([("ansicyan", "› ")]))
            except (EOFError, KeyboardInterrupt):
                return 0
            if not self.handle(line):
                return 0

    def welcome(self) -> None:
        self.console.print("[dim]👾 lms chat[/dim]")
        self.console.print(f"Chatting with [bold]{self.model.identifier}[/bold]. Type /help "
                           "for commands; exit, Ctrl+D or Ctrl+C on an empty line to quit.")
        self.console.print("[dim]Alt+Enter (or Esc, Enter) starts a new line.[/dim]")

    def handle(self, line: str) -> bool:
        """Act on one input; False means quit."""
        text = line.strip()
        if not text:
            return True
        if text in ("exit", "quit"):
            return False
        if text.startswith("/") and text.split()[0] not in PASS_THROUGH:
            name, _, arg = text.partition(" ")
            command = self.commands.get(name)
            if command is None:
                self.console.print(f"Unknown command: {name}. Type /help for the list.",
                                   markup=False)
                return True
            return command[1](arg.strip())
        self.chat.add_user_message(text)
        self.reply()
        return True

    def reply(self) -> None:
        if self.tools:
            self.reply_with_tools()
            return
        view = chat_view.ReplyView(self.console)
        guard = InterruptGuard()
        stream = None
        try:
            with guard:
                stream = self.model.respond_stream(
                    self.chat, config=self.config,
                    on_prompt_processing_progress=guard.wrap(view.progress))
                for fragment in stream:
                    guard.wrap(view.add)(fragment.content)
                result = stream.result()
        except KeyboardInterrupt:
            if stream is not None:
                stream.close()  # the server stops generating when the connection closes
            view.finish()
            self.console.print("[red][Response stopped by user][/red]")
            self._keep_partial(view.text)
            return
        except LMSError as exc:
            view.finish()
            self.console.print(f"Prediction error: {exc.message}", style="red", markup=False)
            self.chat.drop_last()  # let the user send it again
            return
        view.finish()
        self.chat.add_assistant_response(result.content)
        self.last_stats = result.stats
        if self.show_stats:
            self.console.print(render.stats_summary(result.stats), style="dim", markup=False)

    def reply_with_tools(self) -> None:
        """A reply that may call tools: each round streams as a reply does, and each call
        and its result show between the rounds."""
        views: list[chat_view.ReplyView] = []
        guard = InterruptGuard()

        def round_start(_: int) -> None:
            views.append(chat_view.ReplyView(self.console))

        def completed(result: Any) -> None:
            views[-1].finish()
            self.last_stats = result.stats

        def message(msg: Any) -> None:  # act() works on a copy: the session keeps its own
            self.chat.append(msg)
            self.tool_view.message(msg)

        try:
            with guard:
                self.model.act(self.chat, self.tools, config=self.config,
                               max_prediction_rounds=TOOL_ROUNDS,
                               on_round_start=guard.wrap(round_start),
                               on_prediction_fragment=guard.wrap(
                                   lambda fragment, _i: views[-1].add(fragment.content)),
                               on_prediction_completed=guard.wrap(completed),
                               on_message=message)
        except KeyboardInterrupt:
            for view in views:
                view.finish()
            self.console.print("[red][Response stopped by user][/red]")
            return
        except LMSError as exc:
            for view in views:
                view.finish()
            self.console.print(f"Prediction error: {exc.message}", style="red", markup=False)
            return
        if self.show_stats and self.last_stats is not None:
            self.console.print(render.stats_summary(self.last_stats), style="dim",
                               markup=False)

    def _keep_partial(self, text: str) -> None:
        if text.strip():
            self.chat.add_assistant_response(text)
        else:
            self.chat.drop_last()

    # -- commands -------------------------------------------------------------------------

    def cmd_help(self, _: str) -> bool:
        self.console.print("Available commands:")
        for name in sorted(self.commands):
            self.console.print(f"  {name} - {self.commands[name][0]}", markup=False)
        self.console.print("  exit, quit, Ctrl+D - Exit the chat", markup=False)
        return True

    def cmd_model(self, key: str) -> bool:
        if not key:
            current = self.model.identifier
            for m in catalog.list_models():
                mark = "  (current)" if m.model_key == current else ""
                self.console.print(f"  {m.model_key}{mark}", markup=False)
            return True
        try:
            named = steps.served_as_named(self.model.client, key)  # linked models too
            resolved = key if named else steps.resolve_key(key, exact=False, yes=True)
            self.model = (self._load_model or self._default_loader)(resolved)
        except LMSError as exc:
            self.console.print(f'Model "{key}" not found: {exc.message} Use lms get to '
                               "download it, or /model to list the available ones.",
                               markup=False)
            return True
        self.console.print(f"Model Selected: {self.model.get_info().display_name}",
                           markup=False)
        return True

    def _default_loader(self, key: str) -> Any:
        return steps.load_with_progress(self.model.client, key, self.ttl)

    def cmd_clear(self, _: str) -> bool:
        self.chat = Chat(self.system_prompt)
        self.console.print("Chat history cleared.")
        return True

    def cmd_system_prompt(self, text: str) -> bool:
        if not text:
            self.console.print(f"System prompt: {self.system_prompt}", markup=False)
            return True
        rest = [m for m in self.chat.messages if m["role"] != "system"]
        self.system_prompt = text
        self.chat = Chat.from_history({"messages": [{"role": "system", "content": text},
                                                    *rest]})
        self.console.print(f"System prompt updated to: {text}", markup=False)
        return True

    def cmd_stats(self, _: str) -> bool:
        if self.last_stats is None:
            self.console.print("No previous generation stats available.")
        else:
            for line in render.stats_lines(self.last_stats)[2:]:
                self.console.print(line, markup=False)
        return True

    def cmd_set(self, arg: str) -> bool:
        name, _, value = arg.partition(" ")
        if not name:
            for key, (config_key, _kind) in SETTINGS.items():
                self.console.print(f"  {key}: {self.config.get(config_key, 'default')}",
                                   markup=False)
            return True
        if name not in SETTINGS:
            self.console.print(f"Unknown setting {name}. Settings: {', '.join(SETTINGS)}",
                               markup=False)
            return True
        config_key, kind = SETTINGS[name]
        try:
            self.config[config_key] = kind(value)
        except ValueError:
            self.console.print(f"{name} needs a {kind.__name__}, not {value!r}.", markup=False)
            return True
        self.console.print(f"Set {name} to {self.config[config_key]}.", markup=False)
        return True

    def cmd_show(self, _: str) -> bool:
        info = self.model.get_info()
        rows = [("Model", info.model_key), ("Identifier", self.model.identifier),
                ("Architecture", info.architecture), ("Parameters", info.params_string),
                ("Context length", info.context_length), ("Path", info.path),
                ("System prompt", self.system_prompt)]
        rows += [(k, v) for k, v in self.config.items()]
        for label, value in rows:
            self.console.print(f"  {label}: {value}", markup=False)
        return True

    def cmd_retry(self, _: str) -> bool:
        messages = self.chat.messages
        if not messages or messages[-1]["role"] != "assistant":
            self.console.print("Nothing to retry yet.")
            return True
        self.chat.drop_last()
        self.reply()
        return True


class InterruptGuard:
    """Ctrl+C during a reply: raised at once while waiting for the server, but held back
    while the screen is being drawn (an interrupted redraw leaves a garbled terminal)."""

    def __init__(self) -> None:
        self._drawing = False
        self._pending = False
        self._previous: Any = None
        self._tty: list[Any] | None = None

    def __enter__(self) -> InterruptGuard:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        self._quiet_tty()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self._tty is not None:
            import termios

            termios.tcsetattr(sys.stdin, termios.TCSANOW, self._tty)

    def _quiet_tty(self) -> None:
        """No ^C echo and no output flush on Ctrl+C: either would shift the screen under the
        live redraw and leave a copy of the reply behind."""
        try:
            import termios

            if not sys.stdin.isatty():
                return
            self._tty = termios.tcgetattr(sys.stdin)
            quiet = termios.tcgetattr(sys.stdin)
            quiet[3] = (quiet[3] | termios.NOFLSH) & ~(termios.ECHO | termios.ECHOCTL)
            termios.tcsetattr(sys.stdin, termios.TCSANOW, quiet)
        except (ImportError, OSError, ValueError):  # not a POSIX terminal: nothing to tune
            self._tty = None

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        if self._drawing:
            self._pending = True
        else:
            raise KeyboardInterrupt

    def wrap(self, draw: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any) -> Any:
            self._drawing = True
            try:
                return draw(*args)
            finally:
                self._drawing = False
                if self._pending:
                    self._pending = False
                    raise KeyboardInterrupt

        return guarded


class SlashCompleter(Completer):
    """Slash commands, model keys after /model, setting names after /set."""

    def __init__(self, commands: Iterable[str], settings: Iterable[str]) -> None:
        self.commands = sorted(commands)
        self.settings = list(settings)

    def get_completions(self, document: Document, complete_event: Any) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            yield from self._matches(text, self.commands)
        elif text.startswith("/model "):
            word = text[len("/model "):]
            yield from self._matches(word, [m.model_key for m in catalog.list_models()])
        elif text.startswith("/set ") and text.count(" ") == 1:
            yield from self._matches(text[len("/set "):], self.settings)

    @staticmethod
    def _matches(word: str, options: Iterable[str]) -> Iterable[Completion]:
        for option in options:
            if option.startswith(word):
                yield Completion(option, start_position=-len(word))


def make_session(commands: Iterable[str], settings: Iterable[str], *, input: Any = None,
                 output: Any = None, persistent: bool = True) -> PromptSession:
    bindings = KeyBindings()

    @bindings.add("c-c")
    def _ctrl_c(event: Any) -> None:
        # Ctrl+C clears a line being typed; on an empty line it quits
        buffer = event.app.current_buffer
        if buffer.text:
            buffer.reset()
        else:
            event.app.exit(exception=EOFError)

    @bindings.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.app.current_buffer.insert_text("\n")

    history: Any = InMemoryHistory()
    if persistent:
        path = paths.chat_history_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        history = FileHistory(str(path))
    return PromptSession(history=history, completer=SlashCompleter(commands, settings),
                         key_bindings=bindings, input=input, output=output,
                         complete_while_typing=True, enable_history_search=False)
