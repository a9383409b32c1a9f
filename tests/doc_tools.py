"""Tools and loops from LM Studio's docs, shared by the tests."""

from __future__ import annotations

import math
from pathlib import Path
from types import ModuleType
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


def create_file(name: str, content: str):  # noqa: ANN201 - as in the docs
    """Create a file with the given name and content."""
    dest_path = Path(name)
    if dest_path.exists():
        return "Error: File already exists."
    try:
        dest_path.write_text(content, encoding="utf-8")
    except Exception as exc:
        return f"Error: {exc!r}"
    return "File created."


# the docs' interactive loops, run with ``lms`` as either SDK (lmscli's or the official one):
# the tests feed ``input`` and read what they printed

def print_fragment(fragment, round_index=0):  # noqa: ANN001, ANN201 - as in the docs
    print(fragment.content, end="", flush=True)


def docs_chat_loop(lms: ModuleType) -> Any:
    """The docs' multi-turn chat (000_…): returns the chat it built."""
    model = lms.llm()
    chat = lms.Chat("You are a task focused AI assistant")

    while True:
        try:
            user_input = input("You (leave blank to exit): ")
        except EOFError:
            print()
            break
        if not user_input:
            break
        chat.add_user_message(user_input)
        prediction_stream = model.respond_stream(
            chat,
            on_message=chat.append,
        )
        print("Bot: ", end="", flush=True)
        for fragment in prediction_stream:
            print(fragment.content, end="", flush=True)
        print()
    return chat


def docs_act_loop(lms: ModuleType) -> Any:
    """The docs' create_file chat loop (004_…): returns the chat it built."""
    model = lms.llm()
    chat = lms.Chat("You are a task focused AI assistant")

    while True:
        try:
            user_input = input("You (leave blank to exit): ")
        except EOFError:
            print()
            break
        if not user_input:
            break
        chat.add_user_message(user_input)
        print("Bot: ", end="", flush=True)
        model.act(
            chat,
            [create_file],
            on_message=chat.append,
            on_prediction_fragment=print_fragment,
        )
        print()
    return chat
