"""Grammars that constrain sampling: JSON schemas (response_format) become GBNF."""

from __future__ import annotations

import json
from typing import Any


class SchemaError(ValueError):
    """A JSON schema that cannot become a grammar."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """GBNF accepting exactly the JSON documents of ``schema``."""
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    try:
        return json_schema_to_gbnf(json.dumps(schema))
    except Exception as exc:  # the converter raises bare errors for unsupported schemas
        raise SchemaError(f"Unsupported JSON schema: {exc}") from exc


def any_json_grammar() -> str:
    from llama_cpp.llama_grammar import JSON_GBNF

    return JSON_GBNF
