"""One SDK websocket: the auth handshake, then LM Studio's message envelope.

The client allocates the ids: ``rpcCall`` (``callId``) is answered by one ``rpcResult`` or
``rpcError``; ``channelCreate`` (``channelId``) opens a channel whose handler streams
``channelSend`` messages and ends with ``channelClose`` (or ``channelError``). The client may
send ``channelSend`` messages back (``{"type": "cancel"}``, ``{"type": "stop"}``).

Every call and channel runs in its own task, so that a cancel is read while a prediction
streams; when the socket goes away every task is cancelled, and with it what it ran
(predictions stop, loads abort, log readers unsubscribe).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.websockets import WebSocket

from lmscli.server.body import parse_json
from lmscli.server.errors import APIError
from lmscli.server.models import ModelManager
from lmscli.server.sdk.errors import SdkError, serialize
from lmscli.server.security import KEY_CHECKED_SCOPE
from lmscli.server.state import AppState, app_state

log = logging.getLogger("lmscli.server.sdk")

AUTH_TIMEOUT_S = 10.0  # LM Studio's own limit for the first frame
MAX_AUTH_FIELD = 256
MAX_IN_FLIGHT = 256  # calls and channels one socket may hold open at once
MAX_WARNINGS = 5  # communicationWarnings per socket; the rest are only logged
MAX_ID = 2**53 - 1  # ids are JavaScript numbers
POLICY_VIOLATION = 1008
TOKEN_PREFIX = "sk-lm-"  # LM Studio's API tokens: sk-lm-<clientIdentifier>:<clientPasskey>


@dataclass
class Context:
    """What a handler may use: the app's state, and the namespace it was called in."""

    state: AppState
    namespace: str

    @property
    def models(self) -> ModelManager:
        return self.state.models


class Channel:
    """The server's end of one channel."""

    def __init__(self, connection: Connection, channel_id: int) -> None:
        self.id = channel_id
        self._connection = connection
        self.cancelled = asyncio.Event()  # the client sent {"type": "cancel"} or "stop"
        self._on_cancel: list[Callable[[], Any]] = []

    async def send(self, message: dict[str, Any]) -> None:
        await self._connection.send({"type": "channelSend", "channelId": self.id,
                                     "message": message})

    def on_cancel(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` when the client cancels (at once if it already has)."""
        if self.cancelled.is_set():
            fn()
        else:
            self._on_cancel.append(fn)

    def receive(self, message: Any) -> None:
        if isinstance(message, dict) and message.get("type") in ("cancel", "stop") \
                and not self.cancelled.is_set():
            self.cancelled.set()
            for fn in self._on_cancel:
                fn()


RpcHandler = Callable[[Context, Any], Awaitable[Any]]
ChannelHandler = Callable[[Context, Channel, Any], Awaitable[None]]


@dataclass
class Namespace:
    name: str
    rpc: dict[str, RpcHandler] = field(default_factory=dict)
    channels: dict[str, ChannelHandler] = field(default_factory=dict)
    note: str = ""  # said when an endpoint is missing: what lmscli offers instead

    def unknown(self, endpoint: Any) -> SdkError:
        known = sorted([*self.rpc, *self.channels])
        offer = f" It answers: {', '.join(known)}." if known else ""
        return SdkError(f"lmscli does not implement the endpoint {str(endpoint)[:100]!r} in "
                        f"the {self.name!r} namespace.{offer}{self.note}")


class Connection:
    def __init__(self, websocket: WebSocket, namespace: Namespace, api_key: str | None) -> None:
        self.ws = websocket
        self.namespace = namespace
        self.context = Context(app_state(websocket), namespace.name)
        # an upgrade that carried the key needs none in the handshake
        self._key = None if websocket.scope.get(KEY_CHECKED_SCOPE) else api_key
        self._lock = asyncio.Lock()  # one frame at a time on the socket
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: dict[int, Channel] = {}
        self._calls: set[int] = set()
        self._warnings = 0

    async def run(self) -> None:
        await self.ws.accept()
        try:
            if await self._authenticate():
                await self._receive_loop()
        finally:
            await self._end_all()

    # -- the handshake ----------------------------------------------------------------------

    async def _authenticate(self) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AUTH_TIMEOUT_S
        while True:
            try:
                message = await asyncio.wait_for(self.ws.receive(),
                                                 max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                await self._refuse("No authentication message arrived within "
                                   f"{AUTH_TIMEOUT_S:g} seconds.")
                return False
            if message["type"] == "websocket.disconnect":
                return False
            try:
                data = _decode(message)
            except APIError:
                data = None
            # as LM Studio does, anything but an auth packet is ignored while waiting
            if not isinstance(data, dict) or "clientIdentifier" not in data:
                continue
            refusal = self._auth_refusal(data)
            if refusal is not None:
                await self._refuse(refusal)
                return False
            await self.send({"success": True})
            return True

    def _auth_refusal(self, data: dict[str, Any]) -> str | None:
        ident, passkey = data.get("clientIdentifier"), data.get("clientPasskey")
        if data.get("authVersion") != 1:
            return "Unsupported authVersion: this server speaks version 1."
        if not (isinstance(ident, str) and isinstance(passkey, str)) \
                or not 0 < len(ident) <= MAX_AUTH_FIELD or len(passkey) > MAX_AUTH_FIELD:
            return (f"clientIdentifier and clientPasskey must be strings of at most "
                    f"{MAX_AUTH_FIELD} characters.")
        if self._key is None:
            return None
        key = self._key.encode()
        offers = [passkey.encode(), f"{TOKEN_PREFIX}{ident}:{passkey}".encode()]
        # every offer compared in constant time, so that timing tells nothing about the key
        if any([hmac.compare_digest(o, key) for o in offers]):
            return None
        return ("This lmscli server needs an API key. Send it as the clientPasskey (or as an "
                "LM Studio token sk-lm-<clientIdentifier>:<clientPasskey>), or send "
                "'Authorization: Bearer <key>' with the websocket upgrade.")

    async def _refuse(self, reason: str) -> None:
        with contextlib.suppress(Exception):
            # a dict: the SDK reads it as a SerializedLMSExtendedError
            await self.send({"success": False, "error": SdkError(reason).serialized()})
            await self.ws.close(POLICY_VIOLATION)

    # -- the envelope -----------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            try:
                data = _decode(message)
            except APIError as exc:
                await self._refuse_frame(message, exc)
                continue
            if isinstance(data, dict):
                try:
                    await self._dispatch(data)
                except Exception:  # a bug must cost one message, not the connection
                    log.exception("SDK message handling failed")
                    await self._warn("The server failed to handle a message.")
            else:
                await self._warn("A message must be a JSON object.")

    async def _dispatch(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "rpcCall":
            await self._start_call(data)
        elif kind == "channelCreate":
            await self._start_channel(data)
        elif kind == "channelSend":
            channel = self._channels.get(self._id(data, "channelId"))  # type: ignore[arg-type]
            if channel is not None:  # a late cancel for a finished channel is normal
                channel.receive(data.get("message"))
        elif kind == "keepAlive":
            await self.send({"type": "keepAliveAck"})
        elif kind in ("signalSubscribe", "writableSignalSubscribe"):
            await self.send({"type": kind.replace("Subscribe", "Error"),
                             "subscribeId": data.get("subscribeId"),
                             "error": SdkError("lmscli does not implement signals.")
                             .serialized()})
        elif kind in ("channelAck", "signalUnsubscribe", "writableSignalUnsubscribe",
                      "writableSignalUpdate"):
            return
        elif kind == "communicationWarning":
            log.warning("SDK client warning: %s", str(data.get("warning"))[:500])
        else:
            await self._warn(f"Unknown message type {str(kind)[:100]!r}.")

    async def _refuse_frame(self, message: dict[str, Any], error: APIError) -> None:
        """A frame parse_json refused (a lone surrogate, too deep): when its call or channel
        id can still be read, that call or channel ends with the error; else a warning."""
        try:  # leniently: past Python's limit on digits, a number reads as None
            data = json.loads(message.get("text") or message.get("bytes") or "",
                              parse_int=lambda digits: int(digits) if len(digits) < 20 else None)
        except (ValueError, RecursionError):
            data = None
        kind = data.get("type") if isinstance(data, dict) else None
        key = {"rpcCall": "callId", "channelCreate": "channelId"}.get(kind)  # type: ignore
        ident = self._id(data, key) if key else None  # type: ignore[arg-type]
        if ident is None or ident in self._calls or ident in self._channels:
            await self._warn(error.message)
            return
        reply = "rpcError" if kind == "rpcCall" else "channelError"
        await self.send({"type": reply, key: ident,
                         "error": SdkError(error.message).serialized()})

    def _id(self, data: dict[str, Any], key: str) -> int | None:
        value = data.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_ID:
            return value
        return None

    async def _start_call(self, data: dict[str, Any]) -> None:
        call_id = self._id(data, "callId")
        if call_id is None or call_id in self._calls:
            await self._warn("rpcCall needs a callId that is an unused non-negative integer.")
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            await self.send({"type": "rpcError", "callId": call_id, "error": _busy()})
            return
        self._calls.add(call_id)
        handler = self.namespace.rpc.get(_name(data.get("endpoint")))
        self._spawn(self._run_call(call_id, data.get("endpoint"), handler,
                                   data.get("parameter")))

    async def _run_call(self, call_id: int, endpoint: Any, handler: RpcHandler | None,
                        parameter: Any) -> None:
        try:
            if handler is None:
                raise self.namespace.unknown(endpoint)
            result = await handler(self.context, parameter)
            reply: dict[str, Any] = {"type": "rpcResult", "callId": call_id}
            if result is not None:
                reply["result"] = result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            reply = {"type": "rpcError", "callId": call_id, "error": serialize(exc)}
        finally:
            self._calls.discard(call_id)
        await self._send_quietly(reply)

    async def _start_channel(self, data: dict[str, Any]) -> None:
        channel_id = self._id(data, "channelId")
        if channel_id is None or channel_id in self._channels:
            await self._warn("channelCreate needs a channelId that is an unused non-negative "
                             "integer.")
            return
        if len(self._tasks) >= MAX_IN_FLIGHT:
            await self.send({"type": "channelError", "channelId": channel_id,
                             "error": _busy()})
            return
        channel = self._channels[channel_id] = Channel(self, channel_id)
        handler = self.namespace.channels.get(_name(data.get("endpoint")))
        self._spawn(self._run_channel(channel, data.get("endpoint"), handler,
                                      data.get("creationParameter")))

    async def _run_channel(self, channel: Channel, endpoint: Any,
                           handler: ChannelHandler | None, parameter: Any) -> None:
        try:
            if handler is None:
                raise self.namespace.unknown(endpoint)
            await handler(self.context, channel, parameter)
            end: dict[str, Any] = {"type": "channelClose", "channelId": channel.id}
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            end = {"type": "channelError", "channelId": channel.id, "error": serialize(exc)}
        finally:
            self._channels.pop(channel.id, None)
        await self._send_quietly(end)

    # -- sending ----------------------------------------------------------------------------

    async def send(self, data: dict[str, Any]) -> None:
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
        async with self._lock:
            await self.ws.send_text(text)

    async def _send_quietly(self, data: dict[str, Any]) -> None:
        """For replies after the work is done: a client that left needs none."""
        with contextlib.suppress(Exception):
            await self.send(data)

    async def _warn(self, warning: str) -> None:
        self._warnings += 1
        if self._warnings <= MAX_WARNINGS:
            await self._send_quietly({"type": "communicationWarning", "warning": warning})
        else:
            log.warning("SDK protocol warning (not sent): %s", warning)

    # -- lifetime ---------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _end_all(self) -> None:
        """The client went away (or the server stops): nobody reads what is still running."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _name(endpoint: Any) -> str:
    """An endpoint name to look up; anything but a string names nothing."""
    return endpoint if isinstance(endpoint, str) else ""


def _decode(message: dict[str, Any]) -> Any:
    """A frame's JSON (text or binary); raises APIError with what is wrong with it."""
    raw = message.get("bytes")
    return parse_json(raw if raw is not None else (message.get("text") or "").encode())


def _busy() -> dict[str, Any]:
    return SdkError(f"Too many calls and channels are open on this connection (the limit is "
                    f"{MAX_IN_FLIGHT}).").serialized()
