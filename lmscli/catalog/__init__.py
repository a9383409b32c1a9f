"""The local model catalog: GGUF metadata, the model store, ``lms get`` and ``lms import``.

Importing this package is cheap: huggingface_hub is only imported when a download needs it.
"""

from __future__ import annotations

from lmscli.catalog.fetch import BUILTIN_MODELS, DEFAULT_MODEL, TOOL_MODEL, GetResult, get_model
from lmscli.catalog.fuzzy import fuzzy_filter
from lmscli.catalog.gguf import GGUFMetadata, format_params, read_gguf_metadata
from lmscli.catalog.importer import ImportResult, import_model
from lmscli.catalog.store import LocalModel, find_model, list_models, scan_models

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "TOOL_MODEL",
    "GGUFMetadata",
    "GetResult",
    "ImportResult",
    "LocalModel",
    "find_model",
    "format_params",
    "fuzzy_filter",
    "get_model",
    "import_model",
    "list_models",
    "read_gguf_metadata",
    "scan_models",
]
