"""One module per API surface. Each parses its requests (``parsing.py`` holds what they share)
into the pipeline's ``TurnInput`` and renders the turn's events in its own shape, whole or
streamed: ``openai_api`` (chat and text completions, embeddings, ``/api/v0``), ``native``
(lmscli's own routes), ``api_v1`` and ``api_v1_downloads`` (LM Studio's REST v1),
``responses_api`` and ``anthropic_api`` (the agent APIs). The SDK's websocket protocol has
its own package, ``sdk/``.
"""
