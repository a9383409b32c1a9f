"""Tool definitions from LM Studio's tool-use docs, shared by the tests."""

from __future__ import annotations

import math
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


# the docs' act() examples (shared/seeds/004_…)

def multiply(a: float, b: float) -> float:
    """Given two numbers a and b. Returns the product of them."""
    return a * b


def add(a: int, b: int) -> int:
    """Given two numbers a and b, returns the sum of them."""
    return a + b


def is_prime(n: int) -> bool:
    """Given a number n, returns True if n is a prime number."""
    if n < 2:
        return False
    sqrt = int(math.sqrt(n))
    for i in range(2, sqrt):  # noqa: SIM110 - the docs example, as written
        if n % i == 0:
            return False
    return True
