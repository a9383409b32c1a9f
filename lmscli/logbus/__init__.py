"""Diagnostics events for ``lms log stream``: what the model was fed and what it produced.

``bus`` fans events out without ever waiting for a reader and ``events`` builds them; the
server's ``logs_http`` serves them. Plain values in, no HTTP, no server types.
"""

from lmscli.logbus.bus import LogBus, Subscriber, now_ms

__all__ = ["LogBus", "Subscriber", "now_ms"]
