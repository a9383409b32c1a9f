"""A chat template's time budget is its own CPU time: waiting, for a slow call or for the
interpreter while other renders run, doesn't count against it."""

from __future__ import annotations

import threading
import time

import pytest

from lmscli.prompting.template import TemplateTimeout, render_chat

LOOP = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}x"
USER = [{"role": "user", "content": "hi"}]


def test_time_spent_waiting_does_not_count() -> None:
    # eight waits of 0.1 s: 0.8 s of wall time, next to no CPU time
    waits = "{% for i in range(8) %}{% set _ = wait() %}{% endfor %}done"
    started = time.monotonic()
    assert render_chat(waits, USER, time_budget_s=0.3, wait=lambda: time.sleep(0.1)) == "done"
    assert time.monotonic() - started > 0.8


def test_renders_sharing_the_interpreter_each_get_their_whole_budget() -> None:
    # three loops take turns with the GIL: each runs past wall 0.3 s long before it has used
    # 0.3 s itself, and is stopped only then
    spent: list[float] = []
    stopped: list[bool] = []

    def loop() -> None:
        cpu = time.thread_time()
        try:
            render_chat(LOOP, USER, time_budget_s=0.3)
        except TemplateTimeout:
            stopped.append(True)
        spent.append(time.thread_time() - cpu)

    threads = [threading.Thread(target=loop) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stopped == [True] * 3
    assert all(0.3 <= cpu < 1.0 for cpu in spent), spent


def test_a_loop_stops_at_its_budget_when_it_runs_alone() -> None:
    started = time.monotonic()
    with pytest.raises(TemplateTimeout, match="more than 0.3 s"):
        render_chat(LOOP, USER, time_budget_s=0.3)
    # its pauses for the server's threads cost it a little wall time, not much
    assert time.monotonic() - started < 1.0
