"""``lms launch``: each agent's environment and arguments against a real server thread on
the fake engine (--print, --save), and the errors a user meets."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import tomllib

from lmscli.cli.agents import AGENTS
from tests.cli.test_commands import lms
from tests.conftest import ThreadServer


@pytest.fixture
def user_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "user"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in ("CLAUDE_CONFIG_DIR", "CODEX_HOME", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(var, raising=False)
    return home


def printed(out: str) -> tuple[dict[str, str], list[str]]:
    """The exported variables and the command of ``--print``'s output."""
    env, command = {}, []
    for line in out.splitlines():
        if line.startswith("export "):
            key, _, value = line.removeprefix("export ").partition("=")
            env[key] = shlex.split(value)[0]
        elif line.startswith("# then run: "):
            command = shlex.split(line.removeprefix("# then run: "))
    return env, command


def test_claude_gets_the_server_and_model_in_its_environment(
        fake_server: ThreadServer, user_home: Path, capsys) -> None:
    code, out, err = lms(capsys, "launch", "claude", "--model", "tiny-chat", "--print",
                         "--", "-p", "Say hello")
    assert code == 0, err
    env, command = printed(out)
    assert env["ANTHROPIC_BASE_URL"] == fake_server.base_url
    assert env["ANTHROPIC_AUTH_TOKEN"]
    for role in ("MODEL", "SMALL_FAST_MODEL", "DEFAULT_HAIKU_MODEL", "DEFAULT_SONNET_MODEL",
                 "DEFAULT_OPUS_MODEL"):
        assert env[f"ANTHROPIC_{role}"] == "tiny-chat"
    assert env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    assert command == ["claude", "-p", "Say hello"]
    # it loaded the model, with as much context as the model has, and said that is too little
    assert "coding agents need about 32768" in err
    assert not (user_home / ".claude").exists()  # nothing written without --save


def test_codex_gets_a_provider_for_one_run(fake_server: ThreadServer, user_home: Path,
                                           capsys) -> None:
    code, out, err = lms(capsys, "launch", "codex", "--model", "tiny-chat", "--print")
    assert code == 0, err
    env, command = printed(out)
    assert command[0] == "codex" and env == {}
    settings = {}
    for flag, value in zip(command[1::2], command[2::2], strict=True):
        assert flag == "-c"
        settings |= tomllib.loads(value)
    assert settings["model"] == "tiny-chat" and settings["model_provider"] == "lmscli"
    assert settings["model_context_window"] == 256
    assert settings["model_providers"]["lmscli"] == {
        "name": "lmscli", "base_url": fake_server.base_url + "/v1", "wire_api": "responses"}


def test_opencode_gets_an_inline_config(fake_server: ThreadServer, user_home: Path,
                                        capsys) -> None:
    code, out, err = lms(capsys, "launch", "opencode", "--model", "tiny-chat", "--print")
    assert code == 0, err
    env, command = printed(out)
    config = json.loads(env["OPENCODE_CONFIG_CONTENT"])
    assert config["model"] == "lmscli/tiny-chat"
    provider = config["provider"]["lmscli"]
    assert provider["options"]["baseURL"] == fake_server.base_url + "/v1"
    assert provider["models"]["tiny-chat"]["limit"]["context"] == 256
    assert command == ["opencode"]


def test_save_writes_each_agents_own_config_and_keeps_the_rest(
        fake_server: ThreadServer, user_home: Path, capsys) -> None:
    claude = user_home / ".claude/settings.json"
    claude.parent.mkdir()
    claude.write_text(json.dumps({"theme": "dark", "env": {"MY_VAR": "1"}}))
    codex = user_home / ".codex/config.toml"
    codex.parent.mkdir()
    codex.write_text('model = "gpt-5"\n\n[model_providers.lmscli]\nname = "old"\n\n'
                     '[projects."/src"]\ntrust_level = "trusted"\n')
    for agent in AGENTS:
        code, _, err = lms(capsys, "launch", agent, "--model", "tiny-chat", "--save")
        assert code == 0 and "Saved to" in err, err
    settings = json.loads(claude.read_text())
    assert settings["theme"] == "dark" and settings["env"]["MY_VAR"] == "1"
    assert settings["env"]["ANTHROPIC_MODEL"] == "tiny-chat"
    toml = tomllib.loads(codex.read_text())
    assert toml["model"] == "gpt-5"  # the user's default is theirs: a profile is added
    assert toml["projects"]["/src"]["trust_level"] == "trusted"
    assert toml["profiles"]["lmscli"]["model"] == "tiny-chat"
    assert toml["model_providers"]["lmscli"]["base_url"] == fake_server.base_url + "/v1"
    opencode = json.loads((user_home / ".config/opencode/opencode.json").read_text())
    assert opencode["model"] == "lmscli/tiny-chat"


def test_a_config_that_cannot_be_read_is_not_overwritten(
        fake_server: ThreadServer, user_home: Path, capsys) -> None:
    claude = user_home / ".claude/settings.json"
    claude.parent.mkdir()
    claude.write_text("{not json")
    code, _, err = lms(capsys, "launch", "claude", "--model", "tiny-chat", "--save")
    assert code == 1 and "is not a JSON object" in err and "Traceback" not in err
    assert claude.read_text() == "{not json"


def test_a_missing_agent_says_how_to_install_it(
        fake_server: ThreadServer, user_home: Path, capsys,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(user_home))
    for agent, about in AGENTS.items():
        code, out, err = lms(capsys, "launch", agent, "--model", "tiny-chat")
        assert code == 1 and out == ""
        assert f"{about.title} is not installed" in err
        assert f"npm install -g {about.npm}" in err


def test_an_unknown_agent_is_a_usage_error(fake_server: ThreadServer, capsys) -> None:
    code, _, err = lms(capsys, "launch", "cursor")
    assert code == 1 and "Choose one of: claude, codex, opencode" in err
