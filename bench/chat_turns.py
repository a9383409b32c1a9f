"""KV reuse across chat turns: time to first token of turn 1 vs turn 10 on the real server.

A ten-turn conversation goes through the SDK (``on_message=chat.append``, as ``lms chat``
keeps history). Then the same tenth turn is sent cold, after an unrelated prompt has taken
over the cache, to show what the reuse saves. Prints medians over --repeats conversations:

    .venv/bin/python bench/chat_turns.py [--repeats 3] [--port 18235]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from lmscli import catalog

QUESTIONS = ["Name a fruit.", "Why is the sky blue?", "Name a colour.", "What is 7 times 8?",
             "Name a big city.", "What do bees make?", "Name an animal.", "What is rain?",
             "Name a planet.", "Summarise our conversation in one sentence."]


def conversation(lms: object, model: object) -> tuple[list[dict], object]:
    evict(model)  # turn 1 starts cold, as in a new session
    chat = lms.Chat("You are a helpful assistant. Answer briefly.")  # type: ignore[attr-defined]
    turns = []
    for i, question in enumerate(QUESTIONS):
        chat.add_user_message(question)
        if i == len(QUESTIONS) - 1:
            last_chat = chat.copy()
        result = model.respond(chat, on_message=chat.append,  # type: ignore[attr-defined]
                               config={"temperature": 0, "maxTokens": 48})
        s = result.stats
        turns.append({"ttft": s.time_to_first_token_sec, "prompt": s.prompt_tokens_count,
                      "cached": s.cached_prompt_tokens_count or 0})
    return turns, last_chat


def evict(model: object) -> None:
    """Another prompt takes over the KV cache."""
    model.respond("Tell me about volcanoes.", config={"maxTokens": 4})  # type: ignore


def cold_ttft(model: object, chat: object) -> float:
    evict(model)
    result = model.respond(chat, config={"temperature": 0, "maxTokens": 4})  # type: ignore
    return result.stats.time_to_first_token_sec


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--port", type=int, default=18235)
    args = parser.parse_args()
    model_file = catalog.find_model(catalog.DEFAULT_MODEL).abs_path
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp)
        target = home / "models/HuggingFaceTB/SmolLM2-135M-Instruct-GGUF" / model_file.name
        target.parent.mkdir(parents=True)
        target.symlink_to(model_file.resolve())
        env = os.environ | {"LMSCLI_HOME": str(home)}
        server = subprocess.Popen([sys.executable, "-m", "lmscli.server", "--port",
                                   str(args.port)], env=env, stderr=subprocess.DEVNULL)
        try:
            wait(args.port)
            os.environ["LMSCLI_HOME"] = str(home)
            import lmscli as lms

            model = lms.llm(catalog.DEFAULT_MODEL)
            model.respond("warm up", config={"maxTokens": 2})
            runs = []
            for _ in range(args.repeats):
                turns, last_chat = conversation(lms, model)
                runs.append((turns, cold_ttft(model, last_chat)))
        finally:
            server.terminate()
            server.wait(timeout=20)
    report(runs)


def wait(port: int) -> None:
    for _ in range(200):
        try:
            httpx.get(f"http://127.0.0.1:{port}/lmstudio-greeting", timeout=0.5)
            return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the server did not start")


def report(runs: list[tuple[list[dict], float]]) -> None:
    med = statistics.median
    print(f"{'turn':>4} {'prompt tok':>10} {'cached':>7} {'TTFT ms (median)':>17}")
    for i in range(len(QUESTIONS)):
        rows = [turns[i] for turns, _ in runs]
        ttft = med(r["ttft"] for r in rows) * 1000
        print(f"{i + 1:>4} {med(r['prompt'] for r in rows):>10.0f} "
              f"{med(r['cached'] for r in rows):>7.0f} {ttft:>17.1f}")
    t1 = med(turns[0]["ttft"] for turns, _ in runs)
    t10 = med(turns[-1]["ttft"] for turns, _ in runs)
    cold = med(c for _, c in runs)
    print(f"turn 10 / turn 1 TTFT: {t10 / t1:.2f}   turn 10 cold (no reuse): {cold * 1000:.1f} ms"
          f" = {cold / t10:.1f}x the warm turn 10")


if __name__ == "__main__":
    main()
