"""Python functions as tools: schemas like LM Studio's SDK makes, argument conversion, toolbox."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Literal

import pytest

from lmscli.client.toolbox import make_toolbox
from lmscli.client.tools import ArgumentError, convert_arguments, tool_def
from lmscli.errors import UserInputError


def f(a: int, b: str = "x", c: list[int] | None = None) -> int:
    """doc"""
    return a


def test_schema_matches_the_sdk() -> None:
    assert tool_def(f).openai() == {
        "type": "function", "function": {"name": "f", "description": "doc", "parameters": {
            "type": "object", "properties": {
                "a": {"type": "integer"}, "b": {"default": "x", "type": "string"},
                "c": {"anyOf": [{"items": {"type": "integer"}, "type": "array"},
                                {"type": "null"}], "default": None}},
            "required": ["a"]}}}
    assert json.loads(json.dumps(tool_def(f).openai())) == tool_def(f).openai()


class Colour(Enum):
    RED = "red"
    BLUE = "blue"


def test_more_types() -> None:
    def g(flag: bool, ratio: float, mode: Literal["fast", "slow"], colour: Colour,
          extra: dict) -> None:
        """More types."""

    props = tool_def(g).parameters["properties"]
    assert props["flag"] == {"type": "boolean"} and props["ratio"] == {"type": "number"}
    assert props["mode"] == {"enum": ["fast", "slow"]}
    assert props["colour"] == {"enum": ["red", "blue"]}
    assert props["extra"] == {"type": "object"}


def test_unresolvable_hints_fall_back_to_any() -> None:
    def h(x: Undefined, y: int) -> None:  # type: ignore[name-defined]  # noqa: F821
        """A tool whose hint names a class the module cannot see."""

    props = tool_def(h).parameters["properties"]
    assert props == {"x": {}, "y": {"type": "integer"}}


def test_missing_docstring_is_an_error() -> None:
    def nodoc(x: int) -> int:
        return x

    with pytest.raises(UserInputError, match="no docstring"):
        tool_def(nodoc)


def test_dict_tools() -> None:
    tool = tool_def({"name": "add", "description": "Adds.", "implementation": lambda a, b: a + b,
                     "parameters": {"a": int, "b": {"type": int, "default": 2}}})
    assert tool.parameters["required"] == ["a"]
    assert tool.parameters["properties"]["b"] == {"default": 2, "type": "integer"}


def test_argument_conversion() -> None:
    tool = tool_def(f)
    assert convert_arguments(tool, {"a": 3.0, "b": "y", "zzz": 1}) == {"a": 3, "b": "y"}
    assert convert_arguments(tool, {"a": 1, "c": [1, 2]}) == {"a": 1, "c": [1, 2]}
    assert convert_arguments(tool, {"a": 1, "c": None})["c"] is None
    with pytest.raises(ArgumentError, match="Expected `int`, got `str` - at `\\$.a`"):
        convert_arguments(tool, {"a": "seven"})
    with pytest.raises(ArgumentError, match="missing required field `a`"):
        convert_arguments(tool, {"b": "x"})
    with pytest.raises(ArgumentError):
        convert_arguments(tool, {"a": 1, "c": ["x"]})


def test_toolbox_stays_in_its_folder(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    tools = {t.__name__: t for t in make_toolbox(work)}
    assert tools["create_file"]("notes/a.txt", "hello") == "File created."
    assert tools["create_file"]("notes/a.txt", "again") == "Error: File already exists."
    assert (work / "notes/a.txt").read_text() == "hello"
    assert tools["read_file"]("notes/a.txt") == "hello"
    summary = tools["analyze_directory"](".")
    assert summary["files_by_extension"] == {".txt": 1} and summary["total_directories"] == 1
    assert summary["entries"] == ["notes/"]  # what is in it, by name
    for i in range(120):
        (work / f"f{i:03d}.md").write_text("x")
    entries = tools["analyze_directory"]()["entries"]
    assert len(entries) == 101 and entries[-1] == "... and 21 more"
    with pytest.raises(PermissionError):
        tools["read_file"]("../outside.txt")
    with pytest.raises(PermissionError):
        tools["create_file"]("/etc/evil", "x")
    assert getattr(tools["create_file"], "lms_writes", False)
    assert all(tool_def(t).description for t in tools.values())
