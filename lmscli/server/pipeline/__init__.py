"""One prediction on a local model, whatever API asked for it.

A request's way through: an API module (``apis/``) parses its body into a ``TurnInput``
(``turns.py``); ``local.prepare`` turns it into the exact prompt, tool use and grammar
(``tooluse.py`` renders the chat template and parses calls back); ``local.Turn`` submits it
(``running.py`` carries the engine thread's events into the event loop) and streams the reply
as ``turns.TurnOutput`` events, which the API module renders. A linked engine's turn
(``links/turn.py``) streams the same events.
"""
