"""The local model catalog: GGUF metadata, the model store, ``lms get`` and ``lms import``.

Importing this package is cheap: each name loads its module on first use (``lms ps`` needs
none of them), and huggingface_hub is only imported when a download needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lmscli.catalog.fetch import (
        BUILTIN_MODELS,
        DEFAULT_MODEL,
        TOOL_MODEL,
        GetResult,
        get_model,
    )
    from lmscli.catalog.fuzzy import fuzzy_filter
    from lmscli.catalog.gguf import GGUFMetadata, format_params, read_gguf_metadata
    from lmscli.catalog.importer import ImportResult, import_model
    from lmscli.catalog.store import (
        LocalModel,
        find_model,
        list_models,
        remove_model,
        scan_models,
    )

_HOMES = {
    "fetch": ("BUILTIN_MODELS", "DEFAULT_MODEL", "TOOL_MODEL", "GetResult", "get_model"),
    "fuzzy": ("fuzzy_filter",),
    "gguf": ("GGUFMetadata", "format_params", "read_gguf_metadata"),
    "importer": ("ImportResult", "import_model"),
    "store": ("LocalModel", "find_model", "list_models", "remove_model", "scan_models"),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}

__all__ = [
    "BUILTIN_MODELS", "DEFAULT_MODEL", "TOOL_MODEL", "GGUFMetadata", "GetResult", "ImportResult",
    "LocalModel", "find_model", "format_params", "fuzzy_filter", "get_model", "import_model",
    "list_models", "read_gguf_metadata", "remove_model", "scan_models",
]


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module 'lmscli.catalog' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"lmscli.catalog.{module}"), name)
    globals()[name] = value  # the next access is a plain attribute
    return value
