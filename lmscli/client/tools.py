"""Python functions as tools: JSON schemas from type hints, and arguments back to types.

Standard library only (the client must not need pydantic or msgspec). Schemas follow what
LM Studio's SDK produces, e.g. ``def f(a: int, b: str = "x")`` gives properties
``{"a": {"type": "integer"}, "b": {"default": "x", "type": "string"}}``, required ``["a"]``.
"""

from __future__ import annotations

import enum
import inspect
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lmscli.errors import UserInputError

_SCALARS: dict[Any, str] = {int: "integer", float: "number", str: "string", bool: "boolean"}


@dataclass
class ToolDef:
    name: str
    description: str
    parameters: dict[str, Any]
    implementation: Callable[..., Any]
    hints: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name,
                                                 "description": self.description,
                                                 "parameters": self.parameters}}


class ArgumentError(ValueError):
    """Arguments that do not fit the tool's declared types."""


# -- schemas --------------------------------------------------------------------------------

def schema_of(hint: Any) -> dict[str, Any]:
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    if hint in _SCALARS:
        return {"type": _SCALARS[hint]}
    if hint is type(None):
        return {"type": "null"}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return {"enum": [m.value for m in hint]}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return {"anyOf": [schema_of(a) for a in args]}
    if origin is typing.Literal:
        return {"enum": list(args)}
    if hint in (list, tuple, set) or origin in (list, tuple, set):
        return {"items": schema_of(args[0]), "type": "array"} if args else {"type": "array"}
    if hint is dict or origin is dict:
        return {"type": "object"}
    return {}


def tool_def(tool: Any) -> ToolDef:
    """A callable, or a dict {"name", "description", "parameters", "implementation"}."""
    if isinstance(tool, ToolDef):
        return tool
    if isinstance(tool, Mapping):
        return _from_mapping(tool)
    if callable(tool):
        return _from_callable(tool)
    raise UserInputError(f"Not a tool: {tool!r} (give a function or a dict).")


def _from_callable(fn: Callable[..., Any]) -> ToolDef:
    name = getattr(fn, "__name__", None) or type(fn).__name__
    schema = getattr(fn, "lms_parameters", None)
    if isinstance(schema, dict):  # a tool that brings its own JSON schema (an MCP server's)
        return ToolDef(name, inspect.getdoc(fn) or name, schema, fn, {})
    doc = inspect.getdoc(fn)
    if not doc:
        raise UserInputError(f"Tool {name!r} has no docstring: it is the description that "
                             "tells the model what the tool does.")
    hints = _hints(fn)
    properties, required = {}, []
    for pname, param in inspect.signature(fn).parameters.items():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop = schema_of(hints.get(pname, inspect.Parameter.empty))
        if param.default is param.empty:
            required.append(pname)
        else:
            prop = {"default": param.default, **prop}
        properties[pname] = dict(sorted(prop.items()))
    parameters: dict[str, Any] = {"type": "object", "properties": properties,
                                  "required": required}
    return ToolDef(name, doc, parameters, fn, hints)


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    """Resolved type hints; names that cannot be resolved (a class local to a function,
    with postponed annotations) count as Any rather than failing the whole tool."""
    try:
        hints = typing.get_type_hints(fn)
    except (NameError, TypeError):
        hints = {}
        for name, hint in getattr(fn, "__annotations__", {}).items():
            try:
                hints[name] = typing.get_type_hints(_Probe(hint, fn))["x"]
            except (NameError, TypeError):
                hints[name] = Any
    hints.pop("return", None)
    return hints


class _Probe:
    """One annotation alone, resolved against the function's globals."""

    def __init__(self, hint: Any, fn: Callable[..., Any]) -> None:
        self.__annotations__ = {"x": hint}
        self.__globals__ = getattr(fn, "__globals__", {})
        self.__module__ = getattr(fn, "__module__", None)


def _from_mapping(spec: Mapping[str, Any]) -> ToolDef:
    try:
        name, impl = spec["name"], spec["implementation"]
    except KeyError as exc:
        raise UserInputError(f"A tool dict needs {exc.args[0]!r}.") from None
    properties, required, hints = {}, [], {}
    for pname, declared in (spec.get("parameters") or {}).items():
        if isinstance(declared, Mapping):
            kind, prop = declared.get("type"), schema_of(declared.get("type"))
            if "default" in declared:
                prop = {"default": declared["default"], **prop}
            else:
                required.append(pname)
        else:
            kind, prop = declared, schema_of(declared)
            required.append(pname)
        properties[pname], hints[pname] = dict(sorted(prop.items())), kind
    parameters = {"type": "object", "properties": properties, "required": required}
    return ToolDef(name, spec.get("description", ""), parameters, impl, hints)


# -- arguments ------------------------------------------------------------------------------

def convert_arguments(tool: ToolDef, arguments: Mapping[str, Any]) -> dict[str, Any]:
    """The model's arguments checked and converted to the declared types."""
    out = {}
    for name in tool.parameters.get("required", []):
        if name not in arguments:
            raise ArgumentError(f"Object missing required field `{name}`")
    for name, value in arguments.items():
        if name not in tool.parameters.get("properties", {}):
            continue  # extra arguments are ignored, as the SDK does
        out[name] = _convert(value, tool.hints.get(name, Any), f"$.{name}")
    return out


def _convert(value: Any, hint: Any, path: str) -> Any:
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for option in args:
            try:
                return _convert(value, option, path)
            except ArgumentError:
                continue
        raise ArgumentError(f"Expected `{_name(hint)}`, got `{_json_kind(value)}` - at `{path}`")
    if hint is type(None):
        return _expect(value is None, value, hint, path, None)
    if hint is bool:
        return _expect(isinstance(value, bool), value, hint, path, value)
    if hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool) or \
            isinstance(value, float) and value.is_integer()
        return _expect(ok, value, hint, path, int(value) if ok else None)
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return _expect(ok, value, hint, path, float(value) if ok else None)
    if hint is str:
        return _expect(isinstance(value, str), value, hint, path, value)
    if origin in (list, tuple, set) or hint in (list, tuple, set):
        _expect(isinstance(value, list), value, hint, path, None)
        item = args[0] if args else Any
        items = [_convert(v, item, f"{path}[{i}]") for i, v in enumerate(value)]
        return (origin or hint)(items) if (origin or hint) is not list else items
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        try:
            return hint(value)
        except ValueError:
            raise ArgumentError(f"Invalid enum value {value!r} - at `{path}`") from None
    return value


def _expect(ok: bool, value: Any, hint: Any, path: str, converted: Any) -> Any:
    if not ok:
        raise ArgumentError(f"Expected `{_name(hint)}`, got `{_json_kind(value)}` - at `{path}`")
    return converted


def _name(hint: Any) -> str:
    return {int: "int", float: "float", str: "str", bool: "bool", type(None): "null"}.get(
        hint, getattr(hint, "__name__", str(hint)))


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return {int: "int", float: "float", str: "str", list: "array", dict: "object"}.get(
        type(value), type(value).__name__)
