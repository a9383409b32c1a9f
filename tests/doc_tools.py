"""Tool definitions from LM Studio's tool-use docs, shared by the tests."""

from __future__ import annotations

from typing import Any

# the docs' curl example
SEARCH_PRODUCTS: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "search_products",
        "description": "Search the product catalog by various criteria. Use this whenever a "
                       "customer asks about product availability, pricing, or specifications.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "description": "Search terms or product name"},
                "category": {"type": "string", "description": "Product category to filter by",
                             "enum": ["electronics", "clothing", "home", "outdoor"]},
                "max_price": {"type": "number", "description": "Maximum price in dollars"},
            },
            "required": ["query"],
            "additionalProperties": False,
        },
    },
}
