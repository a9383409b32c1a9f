"""Linked engines: OpenAI-compatible servers whose models this server lists and serves.

The nouns:

- **link** (``registry.Link``): one engine, by name and URL, with its key and its models.
- **upstream model** (``registry.UpstreamModel``): a model as one engine lists it.
- **linked model** (``registry.LinkedModel``): one key served by one or more links (its
  replicas), as ``lms ls`` and the listings show it.
- **link target** (``registry.LinkTarget``): what a request's model name resolves to: the
  key, and the links that serve it, in the order to try them.
- **Linked** (``linked.py``): the registry and the forwarder of one app; ``Linked.target``
  is the one resolver every handler asks.
- **Forwarder** and **attempt** (``forward.py``): sending a request to the first replica that
  answers; an ``Attempt`` is that upstream response, open.
- **upstream reply** (``upstream.UpstreamReply``): what an engine answered, gathered chunk by
  chunk (text, tool calls, usage, finish reason); ``LinkedLog`` shows it on the log bus.
- **linked turn** (``turn.LinkedTurn``): an agent API turn translated to a chat stream, with
  the pipeline's turn events; **linked prediction** (``sdk.LinkedPrediction``): an SDK
  prediction on an engine, with the SDK's messages.
"""
