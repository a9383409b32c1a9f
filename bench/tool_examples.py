"""The docs' tool examples on small models: tool calls made and correct answers.

Runs the three ``act()`` examples of LM Studio's SDK docs (``multiply``, ``add``/``is_prime``,
``create_file``) and the OpenAI-SDK ``get_delivery_date`` two-turn example against a real
server, each ``--runs`` times per model, with the examples' own (default) sampling. Rounds and
tokens are capped so that a model that rambles cannot take hours: ``act()`` gets at most 5
rounds and every prediction at most 300 tokens.

``--source DIR`` runs the server from another checkout (for example the commit before tool-call
recovery, extracted with ``git archive``), so that before and after can be compared:

    .venv/bin/python bench/tool_examples.py [--runs 3] [--models smollm2-135m-instruct,...]
    .venv/bin/python bench/tool_examples.py --source /tmp/before

A run is correct when the final answer states the tool's result: the product 670592745, that
58013 is prime, a hello.txt that says hi, the delivery date the tool returned.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import greeted

CACHE = Path(os.environ.get("LMSCLI_TEST_MODELS",
                            Path.home() / ".cache" / "lmscli-test" / "models"))
MODELS = ["smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"]
CONFIG = {"maxTokens": 300}
MAX_ROUNDS = 5
DATE = "2024-11-19 13:03:17"
# the docs' tools, as the tests run them (the repository root is not on the path of a script)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.doc_tools import add, create_file, is_prime, multiply  # noqa: E402


def digits(text: str) -> str:
    return re.sub(r"(?<=\d)[,\s](?=\d{3})", "", text)


# -- the examples: each returns (tool names called, correct) -----------------------------------

def act_example(model: Any, task: str, tools: list[Callable[..., Any]],
                check: Callable[[str], bool]) -> tuple[list[str], bool]:
    import lmscli as lms

    chat = lms.Chat("You are a task focused AI assistant") if tools == [create_file] else None
    messages: list[Any] = []
    if chat is not None:
        chat.add_user_message(task)
    model.act(chat if chat is not None else task, tools, on_message=messages.append,
              max_prediction_rounds=MAX_ROUNDS, config=CONFIG)
    called = [part["toolCallRequest"]["name"] for m in messages for part in m.content
              if part.get("type") == "toolCallRequest"]
    final = next((m.content[0].get("text", "") for m in reversed(messages)
                  if m.role == "assistant"), "")
    return called, check(final)


def multiply_example(model: Any) -> tuple[list[str], bool]:
    return act_example(model, "What is the result of 12345 multiplied by 54321?", [multiply],
                       lambda text: "670592745" in digits(text))


def prime_example(model: Any) -> tuple[list[str], bool]:
    def says_prime(text: str) -> bool:
        text = digits(text).lower()
        return "58013" in text and "prime" in text and "not" not in text

    return act_example(model, "Is the result of 12345 + 45668 a prime? Think step by step.",
                       [add, is_prime], says_prime)


def create_file_example(model: Any) -> tuple[list[str], bool]:
    Path("hello.txt").unlink(missing_ok=True)
    called, _ = act_example(model, "Create a file named hello.txt that says hi",
                            [create_file], lambda text: True)
    made = Path("hello.txt")
    correct = made.exists() and "hi" in made.read_text().lower()
    made.unlink(missing_ok=True)
    return called, correct


def delivery_example(model_key: str, base_url: str) -> tuple[list[str], bool]:
    from openai import OpenAI

    client = OpenAI(base_url=base_url + "/v1", api_key="lm-studio", max_retries=0)
    tools = [{"type": "function", "function": {
        "name": "get_delivery_date",
        "description": "Get the delivery date for a customer's order. Call this whenever you "
                       "need to know the delivery date, for example when a customer asks "
                       "'Where is my package'",
        "parameters": {"type": "object", "properties": {"order_id": {
            "type": "string", "description": "The customer's order ID."}},
            "required": ["order_id"], "additionalProperties": False}}}]
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful customer support assistant. Use the "
                                      "supplied tools to assist the user."},
        {"role": "user", "content": "Give me the delivery date and time for order number 1017"}]
    response = client.chat.completions.create(model=model_key, messages=messages, tools=tools,
                                              max_tokens=300)
    calls = response.choices[0].message.tool_calls
    if not calls:
        return [], False  # the docs' script crashes here: tool_calls is None
    call = calls[0]
    order_id = json.loads(call.function.arguments).get("order_id")
    messages += [{"role": "assistant", "tool_calls": [
                     {"id": call.id, "type": call.type, "function": call.function}]},
                 {"role": "tool", "tool_call_id": call.id,
                  "content": json.dumps({"order_id": order_id, "delivery_date": DATE})}]
    final = client.chat.completions.create(model=model_key, messages=messages, max_tokens=300)
    text = final.choices[0].message.content or ""
    dated = any(s in text for s in ("2024-11-19", "November 19", "19 November", "11/19"))
    return [c.function.name for c in calls], dated


# -- running ---------------------------------------------------------------------------------

def start_server(home: Path, port: int, source: str | None) -> subprocess.Popen[bytes]:
    env = os.environ | {"LMSCLI_HOME": str(home)}
    if source:
        env["PYTHONPATH"] = source
    server = subprocess.Popen([sys.executable, "-m", "lmscli.server", "--port", str(port)],
                              env=env, stderr=subprocess.DEVNULL, cwd=source or None)
    return greeted(server, port, wait_s=30)


def link_models(home: Path) -> None:
    for gguf in CACHE.rglob("*.gguf"):
        target = home / "models" / gguf.relative_to(CACHE)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(gguf.resolve())


def run_model(model_key: str, base_url: str, runs: int) -> dict[str, list[tuple[list[str], bool]]]:
    import lmscli as lms

    model = lms.llm(model_key)
    examples: dict[str, Callable[[], tuple[list[str], bool]]] = {
        "multiply": lambda: multiply_example(model),
        "add/is_prime": lambda: prime_example(model),
        "create_file": lambda: create_file_example(model),
        "delivery": lambda: delivery_example(model_key, base_url),
    }
    results: dict[str, list[tuple[list[str], bool]]] = {name: [] for name in examples}
    for name, example in examples.items():
        for _ in range(runs):
            started = time.perf_counter()
            called, correct = example()
            results[name].append((called, correct))
            print(f"  {model_key} {name}: calls {called or '-'} correct {correct} "
                  f"({time.perf_counter() - started:.0f} s)", file=sys.stderr, flush=True)
    return results


def report(label: str, all_results: dict[str, dict[str, list[tuple[list[str], bool]]]]) -> None:
    print(f"# {label}")
    print(f"{'model':<30} {'example':<14} {'runs with a call':>16} {'tool calls':>10} "
          f"{'correct':>8}")
    for model_key, results in all_results.items():
        for name, rows in results.items():
            with_call = sum(1 for called, _ in rows if called)
            total_calls = sum(len(called) for called, _ in rows)
            correct = sum(1 for _, ok in rows if ok)
            print(f"{model_key:<30} {name:<14} {with_call:>12}/{len(rows):<3} "
                  f"{total_calls:>10} {correct:>6}/{len(rows)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=18236)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--source", help="run the server from this checkout")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        link_models(home)
        server = start_server(home, args.port, args.source)
        os.environ["LMSCLI_HOME"] = str(home)
        work = home / "work"
        work.mkdir()
        os.chdir(work)  # create_file writes here
        try:
            base_url = f"http://127.0.0.1:{args.port}"
            results = {key: run_model(key, base_url, args.runs)
                       for key in args.models.split(",")}
        finally:
            server.terminate()
            server.wait(timeout=30)
    report(f"server from {args.source or 'this checkout'}", results)


if __name__ == "__main__":
    main()
