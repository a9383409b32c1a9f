"""The ``predict`` channel (``respond``, ``respond_stream``, ``complete``, each ``act`` round)
and ``applyPromptTemplate``: the same prompt building, sampling and grammar checks as /v1."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from lmscli.engine import PredictionRequest, SamplingParams
from lmscli.server.errors import Body, bad_request
from lmscli.server.models import Loaded
from lmscli.server.openai_api import STREAM_COALESCE_S
from lmscli.server.parsing import parse_messages, request_grammar, sampling
from lmscli.server.predict import Running, check_grammar
from lmscli.server.sdk.errors import PRESET_NOT_FOUND, SdkError
from lmscli.server.sdk.events import SdkEvents
from lmscli.server.sdk.kvconfig import (
    PredictionConfig,
    collapse,
    load_fields,
    prediction_config,
    sampling_fields,
)
from lmscli.server.sdk.models_ns import find_instance, instance_info
from lmscli.server.sdk.protocol import Channel, Context
from lmscli.server.tooluse import ToolUse, chat_prompt, tool_use


@dataclass
class Prepared:
    prompt: str
    params: SamplingParams
    grammar: str | None
    use: ToolUse | None


async def prepare(entry: Loaded, config: PredictionConfig) -> Prepared:
    body = Body(config.body)
    params = sampling(body)
    messages = parse_messages(body)
    if config.raw_prompt:  # complete(): the SDK's template joins the contents, nothing else
        prompt = "".join(m["content"] for m in messages)
        if not prompt:
            raise bad_request("The prompt is empty: there is nothing to complete.", "prompt")
        use = None
    else:
        use = tool_use(body, entry)
        prompt = await chat_prompt(entry, messages, use)
    grammar = request_grammar(body, use)
    await check_grammar(entry, grammar, "llm.prediction.structured")
    return Prepared(prompt, params, grammar, use)


def request_config(parameter: Any, stack_key: str) -> PredictionConfig:
    """The prediction a ``predict`` (or ``applyPromptTemplate``) parameter asks for."""
    p = Body(parameter, "parameter")
    preset = p.get("fuzzyPresetIdentifier", str)
    if preset:
        raise SdkError(f'Preset "{preset[:100]}" not found: lmscli has no presets. Pass the '
                       "settings in config= instead.", code=PRESET_NOT_FOUND)
    stack = collapse(p.get(stack_key, dict), stack_key)
    return prediction_config(stack, p.data.get("history"))


def _request(ctx: Context, parameter: Any, specifier_key: str,
             stack_key: str) -> tuple[Loaded, PredictionConfig]:
    config = request_config(parameter, stack_key)
    p = Body(parameter, "parameter")
    return find_instance(ctx, p.get(specifier_key, dict, required=True), specifier_key), config


async def predict(ctx: Context, channel: Channel, parameter: Any) -> None:
    entry, config = _request(ctx, parameter, "modelSpecifier", "predictionConfigStack")
    prepared = await prepare(entry, config)
    running = Running(entry, PredictionRequest(prepared.prompt, prepared.params,
                                               prepared.grammar),
                      prepared.use.log_recovered() if prepared.use else None)
    # the engine ends a cancelled prediction with success (userStopped), as LM Studio does
    channel.on_cancel(running.prediction.cancel)
    events = SdkEvents(entry, prepared.use.parser() if prepared.use else None)
    extra = {"modelInfo": instance_info(entry, "llm"),
             "loadModelConfig": {"fields": load_fields(entry, "llm")},
             "predictionConfig": {"fields": sampling_fields(prepared.params) + config.echo}}
    async for event in running.events(coalesce_s=STREAM_COALESCE_S):
        for message in events.convert(event):
            if message["type"] == "success":
                message.update(extra)  # the client needs all four of its keys
            await channel.send(message)


async def apply_prompt_template(ctx: Context, parameter: Any) -> dict[str, Any]:
    entry, config = _request(ctx, parameter, "specifier", "predictionConfigStack")
    return {"formatted": (await prepare(entry, config)).prompt}
