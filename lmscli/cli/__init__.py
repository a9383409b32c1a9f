"""The ``lms`` command."""

import sys

# httpx imports its own command line (click, rich's markdown and pygments) whenever those are
# installed, and uvicorn and rich bring them. lms never runs it: marking it missing makes
# httpx skip it, which takes a good part off the start of every command that talks to the
# server. It changes nothing once httpx is already imported.
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]
