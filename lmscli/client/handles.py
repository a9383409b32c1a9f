"""Model handles: ``LLM``, ``DownloadedModel`` and ``client.llm`` (``LlmNamespace``)."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from lmscli.client.act import ActLoop
from lmscli.client.history import Chat, to_openai_message
from lmscli.client.prediction import Callbacks, PredictionStream
from lmscli.client.results import ActResult, LlmInfo, PredictionResult
from lmscli.client.transport import Transport
from lmscli.errors import ModelNotFoundError, UserInputError


class ModelServer(Protocol):
    """What a handle needs of its client; ``Client`` is one. The handles name this rather than
    ``Client`` because ``Client`` builds them: this module stays below client.py."""

    @property
    def transport(self) -> Transport: ...

    @property
    def llm(self) -> LlmNamespace: ...

    def loaded_models_info(self) -> list[dict[str, Any]]: ...

    def load(self, model_key: str, *, identifier: str | None = None,
             context_length: int | None = None, gpu: float | str | None = None,
             ttl: int | None = None, get_or_load: bool = False, parallel: int | None = None,
             on_progress: Callable[[float], None] | None = None) -> dict[str, Any]: ...

    def unload(self, identifier: str) -> None: ...


# SDK prediction config keys (snake_case form) → the server's request fields;
# speculativeDecoding ("off" or "ngram") is lmscli's, draftModel and the draft lengths
# (speculativeDecodingNumDraftTokensExact, …MinDraftLengthToConsider) LM Studio's
_PREDICTION_KEYS = {
    "temperature": "temperature", "max_tokens": "max_tokens", "top_p_sampling": "top_p",
    "top_k_sampling": "top_k", "min_p_sampling": "min_p", "repeat_penalty": "repeat_penalty",
    "stop_strings": "stop", "seed": "seed", "speculative_decoding": "speculative",
    "draft_model": "draft_model",
    "speculative_decoding_num_draft_tokens_exact": "draft_max_tokens",
    "speculative_decoding_min_draft_length_to_consider": "draft_min_tokens",
}


def snake(key: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", key).lower()


def prediction_fields(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """camelCase or snake_case SDK config → request fields; unknown keys are dropped as the SDK
    does."""
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        field = _PREDICTION_KEYS.get(snake(key))
        if field is None:
            continue
        if field == "temperature" and (not isinstance(value, int | float) or value < 0):
            raise UserInputError(f"config temperature must be a number >= 0, not {value!r}.")
        if field == "max_tokens" and value is False:
            value = -1  # "no limit"
        if field == "speculative" and value not in ("off", "ngram"):
            raise UserInputError(f'config speculativeDecoding must be "off" or "ngram", not '
                                 f"{value!r}.")
        out[field] = value
    return out


def load_fields(config: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in (config or {}).items():
        name = snake(key)
        if name == "context_length":
            out["context_length"] = value
        elif name == "gpu" and isinstance(value, Mapping) and "ratio" in value:
            out["gpu"] = value["ratio"]
        elif name in ("max_parallel_predictions", "parallel", "num_parallel_sessions"):
            out["parallel"] = value
    return out


def response_format_field(response_format: Any) -> dict[str, Any] | None:
    """A pydantic model class, a JSON schema, or {"type": "json", "jsonSchema": ...}."""
    if response_format is None:
        return None
    if hasattr(response_format, "model_json_schema"):
        schema = response_format.model_json_schema()
    elif isinstance(response_format, Mapping) and response_format.get("type") == "json":
        schema = response_format.get("jsonSchema") or {}
    elif isinstance(response_format, Mapping):
        schema = dict(response_format)
    else:
        raise UserInputError("response_format must be a JSON schema dict or a pydantic model.")
    return {"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}


def openai_messages(chat: Chat) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for message in chat.messages:
        converted = to_openai_message(message)
        results = converted.pop("results", None)
        if results:
            out += [{"role": "tool", "content": r["content"], "tool_call_id": r["tool_call_id"]}
                    for r in results]
        else:
            out.append(converted)
    return out


class LLM:
    """A handle on one loaded model instance."""

    def __init__(self, client: ModelServer, identifier: str) -> None:
        self._client = client
        self.identifier = identifier

    def __repr__(self) -> str:
        return f"LLM(identifier={self.identifier!r})"

    @property
    def client(self) -> ModelServer:
        """The client this model is reached through (to load another model on it)."""
        return self._client

    # -- predictions ----------------------------------------------------------------------

    def respond_stream(self, history: Any, *, response_format: Any = None,
                       config: Mapping[str, Any] | None = None, preset: str | None = None,
                       on_message: Callable[..., Any] | None = None,
                       on_first_token: Callable[..., Any] | None = None,
                       on_prediction_fragment: Callable[..., Any] | None = None,
                       on_prompt_processing_progress: Callable[..., Any] | None = None,
                       ) -> PredictionStream:
        chat = history if isinstance(history, Chat) else Chat.from_history(history)
        return self.stream_chat(chat, response_format=response_format, config=config,
                                 callbacks=Callbacks(on_message, on_first_token,
                                                     on_prediction_fragment,
                                                     on_prompt_processing_progress))

    def stream_chat(self, chat: Chat, *, callbacks: Callbacks, response_format: Any = None,
                    config: Mapping[str, Any] | None = None,
                    tools: list[dict[str, Any]] | None = None,
                    tool_choice: Any = None) -> PredictionStream:
        """One round of a chat, with tools offered: what ``act()`` builds its rounds on."""
        body: dict[str, Any] = {"messages": openai_messages(chat)}
        if tools:
            body["tools"] = tools
            if tool_choice is not None:
                body["tool_choice"] = tool_choice
        return self._stream(body, response_format, config, callbacks)

    def act(self, chat: Any, tools: Iterable[Any], *,
            max_prediction_rounds: int | None = None,
            max_parallel_tool_calls: int | None = 1,
            config: Mapping[str, Any] | None = None, preset: str | None = None,
            on_message: Callable[..., Any] | None = None,
            on_first_token: Callable[..., Any] | None = None,
            on_prediction_fragment: Callable[..., Any] | None = None,
            on_round_start: Callable[..., Any] | None = None,
            on_round_end: Callable[..., Any] | None = None,
            on_prediction_completed: Callable[..., Any] | None = None,
            on_prompt_processing_progress: Callable[..., Any] | None = None,
            handle_invalid_tool_request: Callable[..., Any] | None = None,
            tool_choice: Any = None) -> ActResult:
        """Predict, run the tools the model asks for, repeat until it answers without tools.

        ``tool_choice`` ("auto", "required" or {"type": "function", ...}) is an lmscli
        extension that applies to the first round (e.g. to force one tool call)."""
        callbacks = {"on_message": on_message, "on_first_token": on_first_token,
                     "on_prediction_fragment": on_prediction_fragment,
                     "on_round_start": on_round_start, "on_round_end": on_round_end,
                     "on_prediction_completed": on_prediction_completed,
                     "on_prompt_processing_progress": on_prompt_processing_progress,
                     "handle_invalid_tool_request": handle_invalid_tool_request}
        return ActLoop(self, chat, tools, max_prediction_rounds=max_prediction_rounds,
                       max_parallel_tool_calls=max_parallel_tool_calls, config=config,
                       tool_choice=tool_choice, callbacks=callbacks).run()

    def respond(self, history: Any, **kwargs: Any) -> PredictionResult:
        with self.respond_stream(history, **kwargs) as stream:
            return stream.wait_for_result()

    def complete_stream(self, prompt: str, *, response_format: Any = None,
                        config: Mapping[str, Any] | None = None, preset: str | None = None,
                        on_message: Callable[..., Any] | None = None,
                        on_first_token: Callable[..., Any] | None = None,
                        on_prediction_fragment: Callable[..., Any] | None = None,
                        on_prompt_processing_progress: Callable[..., Any] | None = None,
                        ) -> PredictionStream:
        """Raw text completion: the prompt goes to the model without a chat template."""
        return self._stream({"prompt": prompt}, response_format, config, Callbacks(
            on_message, on_first_token, on_prediction_fragment, on_prompt_processing_progress))

    def complete(self, prompt: str, **kwargs: Any) -> PredictionResult:
        with self.complete_stream(prompt, **kwargs) as stream:
            return stream.wait_for_result()

    def _stream(self, body: dict[str, Any], response_format: Any,
                config: Mapping[str, Any] | None, callbacks: Callbacks) -> PredictionStream:
        body = {"model": self.identifier, **body, **prediction_fields(config)}
        fmt = response_format_field(response_format)
        if fmt:
            body["response_format"] = fmt
        return PredictionStream(self._client.transport, body, structured=fmt is not None,
                                callbacks=callbacks)

    # -- the instance ---------------------------------------------------------------------

    def get_info(self) -> LlmInfo:
        return LlmInfo.from_wire(self._info())

    def get_context_length(self) -> int:
        return int(self._info().get("contextLength", -1))

    def _info(self) -> dict[str, Any]:
        for info in self._client.loaded_models_info():
            # a linked model is also reached as LINK/key (its "aliases")
            if self.identifier in (info["identifier"], *info.get("aliases", ())):
                return info
        raise ModelNotFoundError(f'The model "{self.identifier}" is no longer loaded.')

    def unload(self) -> None:
        self._client.unload(self.identifier)


class DownloadedModel:
    """A model on disk, from ``list_downloaded_models()``."""

    def __init__(self, client: ModelServer, info: dict[str, Any]) -> None:
        self._client = client
        self.info = info
        self.model_key: str = info["modelKey"]
        self.path: str = info["path"]
        self.type: str = info["type"]

    def __repr__(self) -> str:
        return f"DownloadedModel(model_key={self.model_key!r})"

    def model(self, *, ttl: int | None = 3600, config: Mapping[str, Any] | None = None) -> LLM:
        return self._client.llm.model(self.model_key, ttl=ttl, config=config)

    def load_new_instance(self, instance_identifier: str | None = None, *,
                          ttl: int | None = None, config: Mapping[str, Any] | None = None
                          ) -> LLM:
        return self._client.llm.load_new_instance(self.model_key, instance_identifier,
                                                  ttl=ttl, config=config)


class LlmNamespace:
    """``client.llm``: get, load, list and unload LLM instances."""

    def __init__(self, client: ModelServer) -> None:
        self._client = client

    def model(self, model_key: str | None = None, *, ttl: int | None = 3600,
              config: Mapping[str, Any] | None = None,
              on_load_progress: Callable[[float], Any] | None = None) -> LLM:
        """No key: the first loaded model. A key: that model, loading it if needed (the TTL
        applies only when this call loads it)."""
        if model_key is None:
            loaded = self._client.loaded_models_info()
            if not loaded:
                raise ModelNotFoundError(
                    "Could not get a model handle: no models are currently loaded.",
                    hint="Load one with: lms load <model>, or name one: lms.llm(\"<key>\")")
            return LLM(self._client, loaded[0]["identifier"])
        info = self._client.load(model_key, ttl=ttl, get_or_load=True,
                                 on_progress=on_load_progress, **load_fields(config))
        return LLM(self._client, info["identifier"])

    def load_new_instance(self, model_key: str, instance_identifier: str | None = None, *,
                          ttl: int | None = None, config: Mapping[str, Any] | None = None,
                          on_load_progress: Callable[[float], Any] | None = None) -> LLM:
        info = self._client.load(model_key, identifier=instance_identifier, ttl=ttl,
                                 on_progress=on_load_progress, **load_fields(config))
        return LLM(self._client, info["identifier"])

    def list_loaded(self) -> list[LLM]:
        return [LLM(self._client, i["identifier"]) for i in self._client.loaded_models_info()
                if i.get("type", "llm") == "llm"]

    def unload(self, identifier: str) -> None:
        self._client.unload(identifier)
