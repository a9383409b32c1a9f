"""LM Studio's SDK protocol: the websockets ``/llm``, ``/embedding``, ``/system``, … that the
official ``lmstudio`` package (and lmscli's NDJSON predict route) speak.

- ``events``: engine events as the SDK's predict channel messages (shared with native.py)
- ``protocol``: one websocket: the auth handshake, the envelope, RPCs and channels
- ``kvconfig``: KV config stacks and chat histories read into lmscli's request fields
- ``models_ns``, ``predict_ch``, ``routes``: what each namespace answers, and its route
- ``errors``: errors as the SDK's SerializedLMSExtendedError
"""
