"""Grammars that constrain sampling: JSON schemas (response_format, forced tool calls) → GBNF.

Our own converter, not llama-cpp-python's: that one leaves backslashes in literals unescaped,
copies regex escapes such as ``\\d`` into the grammar verbatim and accepts an empty ``enum``;
llama.cpp rejects each of those grammars, and sampling with a rejected grammar kills the
process. Here every literal is escaped, every count is bounded, and whatever cannot be expressed
is a ``SchemaError`` that says where in the schema it is.

Keywords that only constrain values (``minimum``, ``multipleOf``, ``uniqueItems``...) and
annotations are ignored, as in llama.cpp: the grammar fixes the shape of the JSON.
"""

from __future__ import annotations

import json
import re
from typing import Any

from lmscli.prompting.gbnf import MAX_REPEAT, literal, repeat
from lmscli.prompting.regex import RegexError, pattern_gbnf

MAX_GRAMMAR_CHARS = 1_000_000
MAX_RULES = 50_000
MAX_DEPTH = 200  # schemas nested deeper (through $refs too) would exhaust Python's stack

# Rules every grammar may use, each added (with what it needs) only when referenced.
BASE_RULES: dict[str, tuple[str, tuple[str, ...]]] = {
    "space": ('" "?', ()),
    "value": ("object | array | string | number | boolean | null",
              ("object", "array", "string", "number", "boolean", "null")),
    "object": ('"{" space ( string ":" space value ( "," space string ":" space value )* )? '
               '"}" space', ("space", "string", "value")),
    "array": ('"[" space ( value ( "," space value )* )? "]" space', ("space", "value")),
    "char": (r'[^"\\\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )', ()),
    "string": (r'"\"" char* "\"" space', ("char", "space")),
    "integral": ('"-"? ( "0" | [1-9] [0-9]{0,15} )', ()),
    "integer": ("integral space", ("integral", "space")),
    "number": ('integral ( "." [0-9]{1,15} )? ( [eE] [-+]? [0-9]{1,15} )? space',
               ("integral", "space")),
    "boolean": ('( "true" | "false" ) space', ("space",)),
    "null": ('"null" space', ("space",)),
    "date": ('[0-9]{4} "-" ( "0" [1-9] | "1" [0-2] ) "-" ( "0" [1-9] | [1-2] [0-9] | "3" [0-1] )',
             ()),
    "time": ('( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] ":" [0-5] [0-9] ( "." [0-9]{3} )? '
             '( "Z" | [+-] ( [01] [0-9] | "2" [0-3] ) ":" [0-5] [0-9] )', ()),
    "date-time": ('date "T" time', ("date", "time")),
    "uuid": (' "-" '.join(f"[0-9a-fA-F]{{{n}}}" for n in (8, 4, 4, 4, 12)), ()),
}
# Tool calls are read back leniently (json.loads(strict=False)), and small models keep to a
# call better when a string may hold a raw newline, as llama-cpp-python's grammars allowed.
LENIENT_CHAR = r'[^"\\] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} )'
FORMATS = ("date", "time", "date-time", "uuid")
_MARKS = {"one": "", "maybe": "?", "many": "*"}
PRIMITIVES = ("string", "number", "integer", "boolean", "null", "object", "array")
_NOT_NAME = re.compile(r"[^a-z0-9]+")


class SchemaError(ValueError):
    """A JSON schema that cannot become a grammar."""


def json_schema_grammar(schema: Any, where: str = "schema", *, lenient: bool = False) -> str:
    """GBNF (start rule ``root``) accepting the JSON documents of ``schema``. Errors name the
    place in the schema, starting with ``where``. ``lenient``: strings may hold raw control
    characters, which strict JSON forbids."""
    converter = _Converter(schema, where)
    if lenient:
        converter.rules["char"] = LENIENT_CHAR
    return converter.grammar()


def any_json_grammar() -> str:
    """GBNF for any JSON object (OpenAI's ``json_object`` response format)."""
    return json_schema_grammar({"type": "object"})


def gbnf_literal(text: str, where: str) -> str:
    """``text`` as a GBNF string literal; what can't be one is a SchemaError about ``where``."""
    try:
        return literal(text)
    except ValueError as exc:
        raise SchemaError(f"{where} holds text a model can't write: {exc}.") from None


class _Converter:
    def __init__(self, schema: Any, where: str) -> None:
        self.schema = schema
        self.where = where
        self.rules: dict[str, str] = {}
        self.refs: dict[str, str] = {}  # $ref → its rule name
        self.depth = 0

    def grammar(self) -> str:
        root = self.visit(self.schema, self.where, frozenset())
        self.rules["root"] = root
        text = "\n".join(f"{name} ::= {body}" for name, body in self.rules.items())
        if len(text) > MAX_GRAMMAR_CHARS:
            raise SchemaError("The schema is too large to become a grammar.")
        return text + "\n"

    # -- rules -----------------------------------------------------------------------------

    def use(self, name: str) -> str:
        """A base rule's name, after adding it and the rules it refers to."""
        if name not in self.rules:
            body, deps = BASE_RULES[name]
            self.rules[name] = body
            for dep in deps:
                self.use(dep)
        return name

    def add(self, hint: str, body: str) -> str:
        """A new rule named after ``hint`` (a schema path), never clashing with another."""
        hint = "-".join(hint.removeprefix(self.where).split(".")[-2:])
        base = _NOT_NAME.sub("-", hint.lower()).strip("-")[:40] or "item"
        name, n = f"{base}-r", 1
        while name in self.rules or name in BASE_RULES:
            n += 1
            name = f"{base}-r{n}"
        self.rules[name] = body
        if len(self.rules) > MAX_RULES:
            raise SchemaError("The schema is too large to become a grammar.")
        return name

    # -- schemas ---------------------------------------------------------------------------

    def visit(self, schema: Any, path: str, pending: frozenset[str]) -> str:
        """A GBNF expression for ``schema``. ``pending``: the $refs entered since the last
        character the grammar must emit; meeting one again would be left recursion."""
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                raise SchemaError(f"{path} is nested too deeply (more than {MAX_DEPTH} levels).")
            return self.visit_schema(schema, path, pending)
        finally:
            self.depth -= 1

    def visit_schema(self, schema: Any, path: str, pending: frozenset[str]) -> str:
        if schema is True or schema == {}:
            return self.use("value")
        if schema is False:
            raise SchemaError(f"{path} is false: no value matches it.")
        if not isinstance(schema, dict):
            raise SchemaError(f"{path} must be a JSON schema (an object).")
        if "$ref" in schema:
            return self.ref(schema["$ref"], path, pending)
        if "const" in schema:
            return self.constant(schema["const"], f"{path}.const")
        if "enum" in schema:
            return self.enum(schema["enum"], f"{path}.enum")
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self.union(schema, key, path, pending)
        if "allOf" in schema:
            return self.visit(self.merge_all_of(schema, path), path, pending)
        kind = schema.get("type")
        if isinstance(kind, list):
            return self.type_union(schema, kind, path, pending)
        if schema.get("nullable") is True:
            rest = {k: v for k, v in schema.items() if k != "nullable"}
            return f"( {self.visit(rest, path, pending)} | {self.use('null')} )"
        return self.typed(schema, kind, path)

    def typed(self, schema: dict[str, Any], kind: Any, path: str) -> str:
        if kind is None:
            kind = _implied_type(schema)
            if kind is None:
                return self.use("value")
        if kind not in PRIMITIVES:
            raise SchemaError(f"{path}.type must be one of {', '.join(PRIMITIVES)} (got "
                              f"{_show(kind)}).")
        if kind == "object":
            return self.object(schema, path)
        if kind == "array":
            return self.array(schema, path)
        if kind == "string":
            return self.string(schema, path)
        return self.use(kind)

    def ref(self, ref: Any, path: str, pending: frozenset[str]) -> str:
        if not isinstance(ref, str):
            raise SchemaError(f"{path}.$ref must be a string.")
        if ref in pending:
            raise SchemaError(f"{path}.$ref {_show(ref)} refers back to itself before any "
                              "value is written (circular).")
        if ref in self.refs:  # being built or built: recursion through an object or array
            return self.refs[ref]
        target = self.resolve(ref, path)
        name = self.refs[ref] = self.add(ref.rsplit("/", 1)[-1] or "ref", "")
        self.rules[name] = self.visit(target, ref, pending | {ref})
        return name

    def resolve(self, ref: str, path: str) -> Any:
        """A local JSON pointer (``#/$defs/x``); fetching other documents is not done."""
        if ref != "#" and not ref.startswith("#/"):
            raise SchemaError(f"{path}.$ref {_show(ref)} is not supported: only local "
                              "references (#/...) are.")
        node = self.schema
        for raw in ref[2:].split("/") if ref != "#" else []:
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise SchemaError(f"{path}.$ref {_show(ref)} points to nothing in the schema.")
        return node

    def constant(self, value: Any, path: str) -> str:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
        except ValueError as exc:  # infinity from a literal like 1e400
            raise SchemaError(f"{path} is not valid JSON: {exc}.") from None
        return gbnf_literal(text, path)

    def enum(self, values: Any, path: str) -> str:
        if not isinstance(values, list) or not values:
            raise SchemaError(f"{path} must be a non-empty array: an empty enum matches "
                              "nothing.")
        return "( " + " | ".join(self.constant(v, f"{path}[{i}]")
                                 for i, v in enumerate(values)) + " )"

    def union(self, schema: dict[str, Any], key: str, path: str,
              pending: frozenset[str]) -> str:
        options = schema[key]
        if not isinstance(options, list) or not options:
            raise SchemaError(f"{path}.{key} must be a non-empty array of schemas.")
        # keywords beside anyOf (a shared "type", say) apply to every alternative
        shared = {k: v for k, v in schema.items() if k not in ("anyOf", "oneOf")}
        alternatives = [self.visit(_with(shared, option), f"{path}.{key}[{i}]", pending)
                        for i, option in enumerate(options)]
        return self.add(f"{path}-{key}", " | ".join(alternatives))

    def type_union(self, schema: dict[str, Any], kinds: list[Any], path: str,
                   pending: frozenset[str]) -> str:
        if not kinds:
            raise SchemaError(f"{path}.type must not be an empty array.")
        alternatives = [self.visit(schema | {"type": kind}, path, pending) for kind in kinds]
        return self.add(f"{path}-types", " | ".join(alternatives))

    def merge_all_of(self, schema: dict[str, Any], path: str) -> dict[str, Any]:
        """allOf as one schema: object parts merged, a single part taken as it is."""
        parts = schema["allOf"]
        if not isinstance(parts, list) or not parts:
            raise SchemaError(f"{path}.allOf must be a non-empty array of schemas.")
        parts = [self.resolve(p["$ref"], path) if isinstance(p, dict) and "$ref" in p else p
                 for p in parts]
        rest = {k: v for k, v in schema.items() if k != "allOf"}
        if len(parts) == 1 and isinstance(parts[0], dict):
            return rest | parts[0]
        if not all(isinstance(p, dict) and _implied_type(p) in ("object", None) for p in parts):
            raise SchemaError(f"{path}.allOf is only supported for object schemas.")
        merged: dict[str, Any] = rest | {"type": "object", "properties": {}, "required": []}
        for part in [rest, *parts]:
            merged["properties"] |= _dict(part.get("properties"), f"{path}.allOf properties")
            merged["required"] += _list(part.get("required"), f"{path}.allOf required")
        return merged

    # -- objects ---------------------------------------------------------------------------

    def object(self, schema: dict[str, Any], path: str) -> str:
        properties = _dict(schema.get("properties"), f"{path}.properties")
        required = _list(schema.get("required"), f"{path}.required")
        # described properties and nothing else, unless more are asked for (as llama.cpp)
        extra = schema.get("additionalProperties", None if "properties" in schema else True)
        if not properties and not required and extra is True:
            return self.use("object")
        for name in required:
            if not isinstance(name, str):
                raise SchemaError(f"{path}.required must be an array of strings.")
            properties.setdefault(name, {})  # required but not described: any value
        members: list[tuple[str, str]] = []  # (kind: one | maybe | many, GBNF)
        for name, sub in properties.items():
            value = self.visit(sub, f"{path}.properties.{name}", frozenset())
            key = gbnf_literal(json.dumps(name, ensure_ascii=False), f"{path}.properties")
            pair = f'{key} space ":" space {value}'
            members.append(("one" if name in required else "maybe", pair))
        if extra not in (None, False):
            value = self.visit(extra, f"{path}.additionalProperties", frozenset())
            members.append(("many", f'{self.use("string")} ":" space {value}'))
        self.use("space")
        # required members first, so that commas are decided early (llama.cpp does the same)
        members.sort(key=lambda m: m[0] != "one")
        return self.add(f"{path}-object",
                        f'"{{" space {self.members(members, path)} "}}" space')

    def members(self, members: list[tuple[str, str]], path: str) -> str:
        """Comma-separated members in order: "one" exactly once, "maybe" at most once,
        "many" any number of times. ``rests[i]`` (members i.. after one was written, so a
        comma leads each) and ``first`` (nothing written yet) are rules, which keeps the
        grammar linear in the member count."""
        if not members:
            return ""
        n = len(members)
        rests = [""] * (n + 1)
        for i in range(n - 1, 0, -1):
            kind, pair = members[i]
            body = f'( "," space {pair} ){_MARKS[kind]} {rests[i + 1]}'.strip()
            rests[i] = self.add(f"{path}-rest", body)
        if members[0][0] == "one":
            return f"{members[0][1]} {rests[1]}".strip()
        # nothing is required (required members sort first): at least one member of i..
        first = ""
        for i in range(n - 1, -1, -1):
            kind, pair = members[i]
            again = f' ( "," space {pair} )*' if kind == "many" else ""
            start = f"{pair}{again} {rests[i + 1]}".strip()
            first = self.add(f"{path}-first", f"{start} | {first}" if first else start)
        return f"{first}?"

    # -- arrays and strings ----------------------------------------------------------------

    def array(self, schema: dict[str, Any], path: str) -> str:
        items = schema.get("items")
        prefix = schema.get("prefixItems", items if isinstance(items, list) else None)
        self.use("space")
        if prefix is not None:
            parts = [self.visit(s, f"{path}.prefixItems[{i}]", frozenset())
                     for i, s in enumerate(_list(prefix, f"{path}.prefixItems"))]
            tail = ""
            if not isinstance(items, list) and items not in (None, False):
                more = self.visit(items, f"{path}.items", frozenset())
                tail = f' ( "," space {more} )*' if parts else f' ( {more} ( "," space {more} )* )?'
            body = ' "," space '.join(parts) + tail
            return self.add(f"{path}-array", f'"[" space {body.strip()} "]" space')
        item = self.visit(True if items is None else items, f"{path}.items", frozenset())
        low, high = _bounds(schema, "minItems", "maxItems", path)
        return self.add(f"{path}-array",
                        f'"[" space {self.separated(item, low, high, path)} "]" space')

    def separated(self, item: str, low: int, high: int | None, path: str) -> str:
        """``low``..``high`` comma-separated ``item``s. Only a rule name is repeated with
        {m,n}: llama.cpp caps the repetitions times the rules inside what is repeated."""
        if high == 0:
            return ""
        more = None if high is None else high - 1
        tail = ""
        if more != 0:
            following = self.add(f"{path}-next", f'"," space {item}')
            tail = f" {following}{repeat(max(low - 1, 0), more)}"
        return f"{item}{tail}" if low else f"( {item}{tail} )?"

    def string(self, schema: dict[str, Any], path: str) -> str:
        if "pattern" in schema:
            pattern = schema["pattern"]
            if not isinstance(pattern, str):
                raise SchemaError(f"{path}.pattern must be a string.")
            try:
                body = pattern_gbnf(pattern, self.use("char"),
                                    lambda rule: self.add(f"{path}-part", rule))
            except RegexError as exc:
                raise SchemaError(f"{path}.pattern {_show(pattern)} is not supported: {exc}") \
                    from None
            return self.add(f"{path}-pattern", f'"\\"" {body} "\\"" {self.use("space")}')
        fmt = schema.get("format")
        if fmt in FORMATS:
            return f'"\\"" {self.use(fmt)} "\\"" {self.use("space")}'
        low, high = _bounds(schema, "minLength", "maxLength", path)
        if low == 0 and high is None:
            return self.use("string")
        chars = f"{self.use('char')}{repeat(low, high)}" if high != 0 else ""
        # a rule of its own: a repetition inside a repeated group counts against llama.cpp's
        # cap on repetitions times rules
        return self.add(f"{path}-string", f'"\\"" {chars} "\\"" {self.use("space")}')


# -- helpers -------------------------------------------------------------------------------

def _implied_type(schema: dict[str, Any]) -> str | None:
    if "properties" in schema or "additionalProperties" in schema or "required" in schema:
        return "object"
    if "items" in schema or "prefixItems" in schema:
        return "array"
    if "pattern" in schema or "minLength" in schema or "maxLength" in schema:
        return "string"
    return None


def _with(shared: dict[str, Any], option: Any) -> Any:
    return shared | option if isinstance(option, dict) and shared else option


def _dict(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SchemaError(f"{where} must be an object.")
    return dict(value)


def _list(value: Any, where: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise SchemaError(f"{where} must be an array.")
    return list(value)


def _bounds(schema: dict[str, Any], low_key: str, high_key: str,
            path: str) -> tuple[int, int | None]:
    low, high = schema.get(low_key), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or value < 0):
            raise SchemaError(f"{path}.{key} must be a non-negative integer.")
    low = low or 0
    if low > MAX_REPEAT:
        raise SchemaError(f"{path}.{low_key} is {low}; at most {MAX_REPEAT} is supported.")
    if high is not None and high < low:
        raise SchemaError(f"{path}.{high_key} is smaller than {low_key}: nothing matches.")
    # past MAX_REPEAT only the lower bound is kept: llama.cpp can't count that far
    return low, high if high is None or high <= MAX_REPEAT else None


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=True)
    return text if len(text) <= 60 else text[:60] + "…"
