"""Diagnostics events for ``lms log stream``: what the model was fed and what it produced.

``bus`` fans events out without ever waiting for a reader, ``events`` builds them and
``http`` serves them (imported only by the server: it needs Starlette).
"""

from lmscli.logbus.bus import LogBus, Subscriber, now_ms

__all__ = ["LogBus", "Subscriber", "now_ms"]
