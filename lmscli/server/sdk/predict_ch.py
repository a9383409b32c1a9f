"""The ``predict`` channel (``respond``, ``respond_stream``, ``complete``, each ``act`` round)
and ``applyPromptTemplate``: the same prompt building, sampling and grammar checks as /v1."""

from __future__ import annotations

from typing import Any

from lmscli.engine import SamplingParams
from lmscli.server.apis.parsing import chat_input, parse_messages, response_grammar, sampling
from lmscli.server.body import Body
from lmscli.server.errors import bad_request
from lmscli.server.models import Loaded
from lmscli.server.pipeline.local import prepare, start_turn
from lmscli.server.pipeline.turns import TurnInput
from lmscli.server.sdk import linked_ch
from lmscli.server.sdk.errors import PRESET_NOT_FOUND, SdkError
from lmscli.server.sdk.events import SdkEvents
from lmscli.server.sdk.kvconfig import (
    PredictionConfig,
    collapse,
    load_fields,
    prediction_config,
    sampling_fields,
)
from lmscli.server.sdk.models_ns import find_instance, instance_info, linked_of, specifier_name
from lmscli.server.sdk.protocol import Channel, Context

STRUCTURED = "llm.prediction.structured"


def turn_input(config: PredictionConfig) -> tuple[TurnInput, SamplingParams]:
    """What a prediction config asks for, as a turn and its sampling."""
    body = Body(config.body)
    params = sampling(body)
    if not config.raw_prompt:
        return chat_input(body, STRUCTURED), params
    # complete(): the SDK's template joins the contents, nothing else
    prompt = "".join(m["content"] for m in parse_messages(body))
    if not prompt:
        raise bad_request("The prompt is empty: there is nothing to complete.", "prompt")
    return TurnInput([], schema_grammar=response_grammar(body), schema_param=STRUCTURED,
                     prompt=prompt), params


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
    spec = parameter.get("modelSpecifier") if isinstance(parameter, dict) else None
    if (found := linked_of(ctx, specifier_name(spec))) is not None:
        config = request_config(parameter, "predictionConfigStack")
        await linked_ch.predict(ctx, channel, config, *found)
        return
    entry, config = _request(ctx, parameter, "modelSpecifier", "predictionConfigStack")
    wanted, params = turn_input(config)
    turn = await start_turn(entry, wanted, params)
    # the engine ends a cancelled prediction with success (userStopped), as LM Studio does
    channel.on_cancel(turn.cancel)
    events = SdkEvents(entry.info)
    extra = {"modelInfo": instance_info(entry, "llm"),
             "loadModelConfig": {"fields": load_fields(entry, "llm")},
             "predictionConfig": {"fields": sampling_fields(params) + config.echo}}
    try:
        async for event in turn.stream():
            for message in events.convert(event):
                if message["type"] == "success":
                    message.update(extra)  # the client needs all four of its keys
                await channel.send(message)
    finally:
        await turn.close()  # the socket went away mid-answer: stop the prediction


async def apply_prompt_template(ctx: Context, parameter: Any) -> dict[str, Any]:
    entry, config = _request(ctx, parameter, "specifier", "predictionConfigStack")
    wanted, _ = turn_input(config)
    return {"formatted": (await prepare(entry, wanted)).prompt}
