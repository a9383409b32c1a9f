"""Freeform tools' grammars (Lark, regex) → GBNF for a forced call's ``input`` string,
checked by llama.cpp's own grammar parser and sampler."""

from __future__ import annotations

import json

import pytest

from lmscli.prompting.lark import GrammarSyntaxError, lark_input_gbnf, regex_input_gbnf
from lmscli.prompting.tools import input_call_grammar
from tests.prompting.test_tools import GrammarChecker, grammar  # noqa: F401 - the fixture

# Codex's apply_patch tool, as it sends it to servers that take freeform tools
APPLY_PATCH = r'''
start: begin_patch hunk+ end_patch
begin_patch: "*** Begin Patch" LF
end_patch: "*** End Patch" LF?

hunk: add_hunk | delete_hunk | update_hunk
add_hunk: "*** Add File: " filename LF add_line+
delete_hunk: "*** Delete File: " filename LF
update_hunk: "*** Update File: " filename LF change_move? change?

filename: /(.+)/
add_line: "+" /(.*)/ LF -> line

change_move: "*** Move to: " filename LF
change: (change_context | change_line)+ eof_line?
change_context: ("@@" | "@@ " /(.+)/) LF
change_line: ("+" | "-" | " ") /(.*)/ LF
eof_line: "*** End of File" LF

%import common.LF
'''
PATCH = ('*** Begin Patch\n*** Update File: util.py\n@@ def add(a, b):\n-    return a+b\n'
         '+    return a + b  # "sum"\n*** Add File: notes.txt\n+hello\n*** End Patch\n')


def escaped(text: str) -> str:
    """The text as it sits between a JSON string's quotes."""
    return json.dumps(text, ensure_ascii=False)[1:-1]


def test_codex_apply_patch_grammar_takes_a_patch_and_nothing_else(
        grammar: GrammarChecker) -> None:  # noqa: F811
    gbnf = lark_input_gbnf(APPLY_PATCH)
    assert grammar.accepts(gbnf, escaped(PATCH))
    assert grammar.accepts(gbnf, escaped(PATCH.removesuffix("\n")))  # LF? at the end
    assert not grammar.accepts(gbnf, escaped(PATCH.replace("*** Begin Patch\n", "")))
    assert not grammar.accepts(gbnf, escaped("*** Begin Patch\n*** End Patch\n"))  # hunk+
    assert not grammar.accepts(gbnf, PATCH)  # a raw newline can't stand in a JSON string


def test_common_imports_ranges_repeats_and_continuation_lines(
        grammar: GrammarChecker) -> None:  # noqa: F811
    gbnf = lark_input_gbnf('''
// numbers, then a tag
start: NUMBER ("," WS? NUMBER)* tag?
     | "none"
tag: " #" ("a".."z")~2..3
%import common (NUMBER, WS)
%ignore WS
''')
    for text, ok in [("1,2.5, 3e4", True), ("none", True), ("7 #ab", True),
                     ("7 #abcd", False), ("7 #a", False), ("x", False), ("1,,2", False)]:
        assert grammar.accepts(gbnf, escaped(text)) is ok, text


def test_regex_grammars_match_the_whole_input(grammar: GrammarChecker) -> None:  # noqa: F811
    gbnf = regex_input_gbnf(r"\d{3}-\d{4}")
    assert grammar.accepts(gbnf, "555-1234")
    assert not grammar.accepts(gbnf, "call 555-1234")


@pytest.mark.parametrize("fmt", ["default", "hermes", "llama3"])
def test_a_forced_freeform_call_holds_its_input_grammar(
        grammar: GrammarChecker, fmt: str) -> None:  # noqa: F811
    gbnf = input_call_grammar("apply_patch", fmt,  # type: ignore[arg-type]
                              lark_input_gbnf(APPLY_PATCH))
    key = "parameters" if fmt == "llama3" else "arguments"
    call = '{"name": "apply_patch", "' + key + '": {"input": "' + escaped(PATCH) + '"}}'
    prefix = {"default": "[TOOL_REQUEST]", "hermes": "<tool_call>\n", "llama3": ""}[fmt]
    suffix = {"default": "[END_TOOL_REQUEST]", "hermes": "\n</tool_call>", "llama3": ""}[fmt]
    assert grammar.accepts(gbnf, prefix + call + suffix)
    assert not grammar.accepts(gbnf, prefix + call.replace("Begin", "Start") + suffix)


@pytest.mark.parametrize("definition, says", [
    ("begin: \"a\"", "no 'start' rule"),
    ("start: a", "'a' is used but never defined"),
    ("start: \"a\"i", "string flags"),
    ("start: /a/i", "regex flags"),
    ("start: /(?=a)/", "not supported"),
    ("%import other.X\nstart: X", "is not supported"),
    ("%import common.NOPE\nstart: NOPE", "not a terminal"),
    ("start: \"a\"\nstart: \"b\"", "defined twice"),
    ("start: (\"a\"", r"expected \)"),
    ("start: {", "unexpected '{'"),
])
def test_grammars_outside_the_subset_say_why(definition: str, says: str) -> None:
    with pytest.raises(GrammarSyntaxError, match=says):
        lark_input_gbnf(definition)
