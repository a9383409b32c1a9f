"""JSON schemas and regexes → GBNF, checked by llama.cpp's own grammar parser and sampler.

The property that keeps the server alive: whatever schema a request carries, the converter
either raises SchemaError or writes a grammar llama.cpp accepts (a rejected grammar used to
crash the process). Besides, the grammars accept exactly the JSON they should.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmscli.prompting.grammar import SchemaError, any_json_grammar, json_schema_grammar
from lmscli.prompting.template import TemplateRenderError, TemplateTimeout, render_chat
from lmscli.prompting.tools import call_grammar
from tests.prompting.test_tools import GrammarChecker, grammar  # noqa: F401 - the fixture

FAST = settings(deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


def accepts(checker: GrammarChecker, schema: Any, value: Any) -> bool:
    return checker.accepts(json_schema_grammar(schema), json.dumps(value, ensure_ascii=False))


# -- the schemas of issue 9 -----------------------------------------------------------------

@pytest.mark.parametrize("value", ['a"b', "back\\slash", "new\nline", "tab\t", "ctl\x01",
                                   "é ü 字 🎉", "]", "#", "{}", "\\u0041"])
def test_const_and_enum_strings_are_escaped(grammar: GrammarChecker,  # noqa: F811
                                            value: str) -> None:
    assert accepts(grammar, {"const": value}, value)
    assert not accepts(grammar, {"const": value}, value + "x")
    assert accepts(grammar, {"enum": ["other", value]}, value)
    assert accepts(grammar, {"enum": ["other", value]}, "other")
    assert not accepts(grammar, {"enum": ["other", value]}, "oth")


@pytest.mark.parametrize("name", ['a"b', "back\\slash", "x]y", "-", "", "root", "space",
                                  "名前", "a b"])
def test_property_names_are_escaped(grammar: GrammarChecker, name: str) -> None:  # noqa: F811
    schema = {"type": "object", "properties": {name: {"type": "integer"}}, "required": [name]}
    assert accepts(grammar, schema, {name: 3})
    assert not accepts(grammar, schema, {name: "3"})
    assert not accepts(grammar, schema, {})


def test_digit_pattern_counts_digits(grammar: GrammarChecker) -> None:  # noqa: F811
    schema = {"type": "string", "pattern": "^\\d{1,3}$"}
    assert [accepts(grammar, schema, v) for v in ["7", "123", "1234", "", "12a"]] == \
        [True, True, False, False, False]


@pytest.mark.parametrize("schema,where", [
    ({"enum": []}, "schema.enum"),
    ({"anyOf": []}, "schema.anyOf"),
    ({"oneOf": "x"}, "schema.oneOf"),
    ({"type": "object", "properties": {"a": {"enum": []}}}, "schema.properties.a.enum"),
    ({"type": "string", "pattern": "(?=a)b"}, "schema.pattern"),
    ({"type": "string", "pattern": "\\bword"}, "schema.pattern"),
    ({"type": "string", "pattern": "(a)\\1"}, "schema.pattern"),
    ({"type": "string", "pattern": "[]"}, "schema.pattern"),
    ({"type": "string", "minLength": 10**6}, "schema.minLength"),
    ({"type": "array", "minItems": 3, "maxItems": 1}, "schema.maxItems"),
    ({"type": "banana"}, "schema.type"),
    ({"$ref": "https://example.com/schema.json"}, "schema.$ref"),
    ({"$ref": "#/$defs/missing"}, "schema.$ref"),
    ({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"}, "$ref"),
    ({"const": float("inf")}, "schema.const"),
    (False, "schema"),
    # planes 4 to 13 are empty; SmolLM2 has no token for their first byte, and a grammar that
    # required one aborted the server
    ({"const": "\U00050000"}, "schema.const"),
    ({"type": "object", "properties": {"ä\U0005b1af": {"type": "integer"}}},
     "schema.properties"),
    ({"type": "string", "pattern": "^\\u{50000}$"}, "schema.pattern"),
    ({"type": "string", "pattern": "^[\\u{40000}-\\u{4ffff}]$"}, "schema.pattern"),
])
def test_schemas_that_cannot_be_grammars_say_where(schema: Any, where: str) -> None:
    with pytest.raises(SchemaError, match=re.escape(where)):
        json_schema_grammar(schema)


def test_huge_counts_stay_small(grammar: GrammarChecker) -> None:  # noqa: F811
    started = time.monotonic()
    gbnf = json_schema_grammar({"type": "array", "items": {"type": "string", "maxLength": 10**9},
                                "maxItems": 10**9})
    assert time.monotonic() - started < 1 and len(gbnf) < 5000
    assert grammar.parses(gbnf)


# -- what the grammars accept -----------------------------------------------------------------

ORDER = {"type": "object", "properties": {
    "id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"},
                                        "maxItems": 2},
    "when": {"type": "string", "format": "date"}, "note": {"type": ["string", "null"]}},
    "required": ["id"]}


@pytest.mark.parametrize("value,ok", [
    ({"id": 1}, True), ({"id": 1, "tags": ["a", "b"]}, True), ({"id": 1, "tags": ["a"] * 3}, False),
    ({"id": 1, "when": "2024-02-29", "note": None}, True), ({"id": 1, "when": "tomorrow"}, False),
    ({"tags": []}, False), ({"id": 1, "extra": 2}, False), ({"id": 1.5}, False),
])
def test_object_schema_accepts_exactly_its_documents(grammar: GrammarChecker,  # noqa: F811
                                                     value: Any, ok: bool) -> None:
    assert accepts(grammar, ORDER, value) is ok


def test_optional_properties_without_required_ones(grammar: GrammarChecker) -> None:  # noqa: F811
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
              "additionalProperties": {"type": "boolean"}}
    for value in [{}, {"a": 1}, {"b": 2}, {"a": 1, "b": 2}, {"x": True}, {"a": 1, "x": True}]:
        assert accepts(grammar, schema, value), value
    for value in [{"b": 2, "a": 1}, {"x": 1}, {"a": 1, "b": 2, "x": "no"}]:
        assert not accepts(grammar, schema, value), value


def test_recursive_refs_and_any_json(grammar: GrammarChecker) -> None:  # noqa: F811
    tree = {"$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"]}}, "$ref": "#/$defs/node"}
    assert accepts(grammar, tree, {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]})
    assert not accepts(grammar, tree, {"v": 1, "kids": [{"w": 2}]})
    assert grammar.accepts(any_json_grammar(), '{"a": [1, {"b": null}], "c": "d"}')
    assert not grammar.accepts(any_json_grammar(), "[1]")


def test_forced_call_grammar_names_the_bad_tool() -> None:
    tools = [{"type": "function", "function": {"name": "ok"}},
             {"type": "function", "function": {"name": "bad", "parameters": {"enum": []}}}]
    with pytest.raises(SchemaError, match=re.escape("tools[1].function.parameters.enum")):
        call_grammar(tools, "hermes")
    assert "ok" in call_grammar(tools, "hermes", name="ok")


# -- generated schemas and regexes ------------------------------------------------------------

NAMES = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=6)
VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), NAMES),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(NAMES, inner, max_size=3)), max_leaves=5)
REGEX_TEXT = st.text(alphabet='ab09\\d{}[]()^$|*+?.-"/,wsDWSbuxnt<=!:', max_size=16)
LEAF = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "number", "integer", "boolean",
                                                    "null", "object", "array", "x", 1])}),
    st.fixed_dictionaries({"const": VALUES}), st.fixed_dictionaries({"enum": st.lists(VALUES)}),
    st.fixed_dictionaries({"type": st.just("string"), "pattern": REGEX_TEXT}),
    st.fixed_dictionaries({"type": st.just("string")}, optional={
        "minLength": st.integers(-1, 2000), "maxLength": st.integers(-1, 2000),
        "format": st.sampled_from(["date", "time", "date-time", "uuid", "uri"])}),
    st.fixed_dictionaries({"$ref": st.sampled_from(["#", "#/$defs/a", "#/$defs/b", "#/x"])}),
    st.just({}), st.booleans(), VALUES)
SCHEMAS = st.recursive(LEAF, lambda inner: st.one_of(
    st.fixed_dictionaries({"type": st.just("object"),
                           "properties": st.dictionaries(NAMES, inner, max_size=4)},
                          optional={"required": st.lists(NAMES, max_size=3),
                                    "additionalProperties": st.one_of(st.booleans(), inner)}),
    st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                          optional={"minItems": st.integers(-1, 1200),
                                    "maxItems": st.integers(-1, 1200),
                                    "prefixItems": st.lists(inner, max_size=2)}),
    st.fixed_dictionaries({st.sampled_from(["anyOf", "oneOf", "allOf"]):
                           st.lists(inner, max_size=3)}),
    st.builds(lambda a, b, s: {"$defs": {"a": a, "b": b}} | s if isinstance(s, dict) else s,
              inner, inner, inner)), max_leaves=10)


@FAST
@given(schema=SCHEMAS)
def test_any_schema_is_a_grammar_llama_cpp_accepts_or_a_schema_error(
        grammar: GrammarChecker, schema: Any) -> None:  # noqa: F811
    try:
        gbnf = json_schema_grammar(schema)
    except SchemaError:
        return
    assert grammar.parses(gbnf), gbnf


PATTERN_ALPHABET = 'ab"\\é\n'
PATTERN_PARTS = st.sampled_from(["a", "b", "é", '"', "\\\\", "\\n", ".", "\\d", "\\w", "\\s",
                                 "\\D", "[ab]", "[^a]", '[a"\\\\]', "[\\d\\s]", "(a|b)",
                                 "(?:ab)", "\\.", "\\x61"])
QUANTIFIERS = st.sampled_from(["", "", "*", "+", "?", "{2}", "{0,2}", "{1,}", "??"])
PATTERNS = st.builds(
    lambda start, parts, end: start + "".join(p + q for p, q in parts) + end,
    st.sampled_from(["", "^"]), st.lists(st.tuples(PATTERN_PARTS, QUANTIFIERS), min_size=1,
                                         max_size=4), st.sampled_from(["", "$"]))


@FAST
@given(pattern=PATTERNS, candidates=st.lists(
    st.text(alphabet=PATTERN_ALPHABET + "19 ", max_size=5), min_size=4, max_size=8))
def test_patterns_accept_what_python_re_matches(grammar: GrammarChecker,  # noqa: F811
                                               pattern: str, candidates: list[str]) -> None:
    """JSON Schema patterns match anywhere unless anchored, as re.search does; their \\d and
    \\w are ASCII and their $ is the very end, as in ECMAScript."""
    gbnf = json_schema_grammar({"type": "string", "pattern": pattern})
    python = pattern[:-1] + "\\Z" if pattern.endswith("$") else pattern  # $ ignores a \n
    for text in candidates:
        expected = re.search(python, text, re.ASCII) is not None
        assert grammar.accepts(gbnf, json.dumps(text, ensure_ascii=False)) is expected, \
            (pattern, text)


# -- templates with a time budget -------------------------------------------------------------

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"


def test_a_looping_template_stops_at_its_budget() -> None:
    started = time.monotonic()
    with pytest.raises(TemplateTimeout, match="more than 0.3 s"):
        render_chat(LOOP, [{"role": "user", "content": "hi"}], time_budget_s=0.3)
    assert time.monotonic() - started < 1.5
    # the trace that stopped it is gone: the same thread renders normally after
    assert render_chat(None, [{"role": "user", "content": "hi"}], time_budget_s=0.3)


@pytest.mark.parametrize("template", ["{{ 'x' * 10**9 }}", "{{ 9 ** 100000 }}",
                                      "{% set ns = namespace(s='ab') %}{% for i in range(60) %}"
                                      "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}"])
def test_templates_cannot_build_huge_values(template: str) -> None:
    with pytest.raises(TemplateRenderError, match="too large"):
        render_chat(template, [], time_budget_s=5)


def test_a_long_chain_of_refs_is_a_schema_error_not_a_stack_overflow() -> None:
    defs: dict[str, Any] = {f"a{i}": {"type": "object", "properties": {
        "next": {"$ref": f"#/$defs/a{i + 1}"}}} for i in range(3000)}
    defs["a3000"] = {"type": "string"}
    with pytest.raises(SchemaError, match="nested too deeply"):
        json_schema_grammar({"$defs": defs, "$ref": "#/$defs/a0"})


def test_strings_are_strict_json_except_in_tool_calls(grammar: GrammarChecker) -> None:  # noqa: F811
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    raw_newline = '{"q": "two\nlines"}'
    assert not grammar.accepts(json_schema_grammar(schema), raw_newline)  # json.loads refuses
    tools = [{"type": "function", "function": {"name": "f", "parameters": schema}}]
    # the call parser reads leniently, and small models write calls better when allowed to
    call = '<tool_call>\n{"name": "f", "arguments": ' + raw_newline + '}\n</tool_call>'
    assert grammar.accepts(call_grammar(tools, "hermes"), call)
