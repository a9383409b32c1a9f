"""What each coding agent needs to run on this server's model: its environment and arguments
for one run, and the config it keeps (``lms launch --save``). Pure: nothing here runs or
writes anything."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

# Claude Code's system prompt and tools alone are ~15k tokens; Codex's ~6k, OpenCode's ~10k
AGENT_CONTEXT = 32768
PLACEHOLDER_KEY = "lmscli"  # the agents insist on a key; this server wants none by default


@dataclass(frozen=True)
class Agent:
    command: str
    title: str
    npm: str

    @property
    def install(self) -> str:
        return f"npm install -g {self.npm}"


AGENTS = {
    "claude": Agent("claude", "Claude Code", "@anthropic-ai/claude-code"),
    "codex": Agent("codex", "Codex", "@openai/codex"),
    "opencode": Agent("opencode", "OpenCode", "opencode-ai"),
}


@dataclass(frozen=True)
class AgentTarget:
    """The server and model an agent is pointed at."""

    base_url: str  # http://host:port
    model: str  # the loaded model's identifier
    context: int  # its context length, in tokens
    api_key: str | None = None  # the server's key, when it wants one


@dataclass
class Launch:
    env: dict[str, str]  # set for the agent's process
    args: list[str]  # after the command's name, before the user's own
    config: Path  # the agent's own config file, which --save writes
    saved: str = ""  # that file's text with this server in it
    then: list[str] = field(default_factory=list)  # how to run it after --save


def launch(agent: str, target: AgentTarget, home: Path, environ: dict[str, str],
           save: bool = False) -> Launch:
    """The run of ``agent`` against ``target``; ``home`` and ``environ`` locate its config,
    which is read (to write it back with this server in it) only to ``save``. Raises
    ValueError for a config file that is not what the agent itself would read."""
    return {"claude": _claude, "codex": _codex, "opencode": _opencode}[agent](
        target, home, environ, save)


# -- Claude Code: environment variables ------------------------------------------------------

def _claude(target: AgentTarget, home: Path, environ: dict[str, str], save: bool) -> Launch:
    env = {"ANTHROPIC_BASE_URL": target.base_url,
           "ANTHROPIC_AUTH_TOKEN": target.api_key or PLACEHOLDER_KEY}
    for role in ("MODEL", "SMALL_FAST_MODEL", "DEFAULT_HAIKU_MODEL", "DEFAULT_SONNET_MODEL",
                 "DEFAULT_OPUS_MODEL"):
        env[f"ANTHROPIC_{role}"] = target.model
    env |= {"CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1", "DISABLE_TELEMETRY": "1",
            "DISABLE_AUTOUPDATER": "1", "DISABLE_ERROR_REPORTING": "1"}
    config = Path(environ.get("CLAUDE_CONFIG_DIR") or home / ".claude") / "settings.json"
    out = Launch(env, [], config, then=["claude"])
    if save:
        settings = _json_file(config)
        settings["env"] = {**_dict(settings.get("env")), **env}
        out.saved = json.dumps(settings, indent=2) + "\n"
    return out


# -- Codex: a model provider, given with -c for one run --------------------------------------

CODEX_PROVIDER = "lmscli"
CODEX_KEY_VAR = "LMSCLI_API_KEY"


def _codex(target: AgentTarget, home: Path, environ: dict[str, str], save: bool) -> Launch:
    provider = {"name": "lmscli", "base_url": f"{target.base_url}/v1", "wire_api": "responses"}
    env = {}
    if target.api_key:  # without env_key, Codex sends no key at all
        provider["env_key"] = CODEX_KEY_VAR
        env[CODEX_KEY_VAR] = target.api_key
    settings = {"model": target.model, "model_provider": CODEX_PROVIDER,
                "model_context_window": target.context, "check_for_update_on_startup": False}
    args = []
    for key, value in settings.items():
        args += ["-c", f"{key}={_toml(value)}"]
    args += ["-c", f"model_providers.{CODEX_PROVIDER}={_toml(provider)}"]
    config = Path(environ.get("CODEX_HOME") or home / ".codex") / "config.toml"
    profile = {k: v for k, v in settings.items() if k != "check_for_update_on_startup"}
    tables = {f"profiles.{CODEX_PROVIDER}": profile,
              f"model_providers.{CODEX_PROVIDER}": provider}
    # only our own tables are replaced: the rest of the file stays as it was, line for line
    saved = _with_tables(_text_file(config), tables) if save else ""
    return Launch(env, args, config, saved, ["codex", "--profile", CODEX_PROVIDER])


def _toml(value: object) -> str:
    """A TOML value: a string, number or bool, or an inline table of them."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a TOML basic string


_TABLE = re.compile(r"^\s*\[([^\[\]]+)\]\s*(#.*)?$")


def _with_tables(text: str, tables: dict[str, dict[str, object]]) -> str:
    """``text`` with ``tables`` written at its end, and any older copies of them removed."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        header = _TABLE.match(line)
        if header:
            skipping = header.group(1).strip() in tables
        if not skipping:
            kept.append(line)
    while kept and not kept[-1].strip():
        kept.pop()
    for name, values in tables.items():
        kept += ["", f"[{name}]"] + [f"{k} = {_toml(v)}" for k, v in values.items()]
    return "\n".join(kept).lstrip("\n") + "\n"


# -- OpenCode: a provider in its JSON config -------------------------------------------------

def _opencode(target: AgentTarget, home: Path, environ: dict[str, str], save: bool) -> Launch:
    options = {"baseURL": f"{target.base_url}/v1"}
    if target.api_key:
        options["apiKey"] = target.api_key
    provider = {"npm": "@ai-sdk/openai-compatible", "name": "lmscli", "options": options,
                "models": {target.model: {"name": target.model, "tool_call": True,
                                          "limit": {"context": target.context,
                                                    "output": min(8192, target.context // 4)}}}}
    model = f"lmscli/{target.model}"
    inline = {"$schema": "https://opencode.ai/config.json", "model": model,
              "small_model": model, "provider": {"lmscli": provider},
              "autoupdate": False, "share": "disabled"}
    env = {"OPENCODE_CONFIG_CONTENT": json.dumps(inline), "OPENCODE_DISABLE_AUTOUPDATE": "1",
           "OPENCODE_DISABLE_MODELS_FETCH": "1"}
    config_dir = Path(environ.get("XDG_CONFIG_HOME") or home / ".config") / "opencode"
    config = config_dir / "opencode.json"
    out = Launch(env, [], config, then=["opencode"])
    if save:
        settings = _json_file(config)
        settings["provider"] = {**_dict(settings.get("provider")), "lmscli": provider}
        settings["model"] = model
        out.saved = json.dumps(settings, indent=2) + "\n"
    return out


# -- files -----------------------------------------------------------------------------------

def _text_file(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""


def _json_file(path: Path) -> dict[str, object]:
    text = _text_file(path)
    if not text.strip():
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):  # never overwrite what can't be read back
        raise ValueError(f"{path} is not a JSON object")
    return data


def _dict(value: object) -> dict[str, object]:
    return value if isinstance(value, dict) else {}


def shell_lines(launch: Launch, agent: str, extra: list[str]) -> list[str]:
    """``export`` lines for a POSIX shell, then the command as a comment."""
    lines = [f"export {k}={shlex.quote(v)}" for k, v in launch.env.items()]
    command = shlex.join([AGENTS[agent].command, *launch.args, *extra])
    return lines + [f"# then run: {command}"]



