"""Who may talk to the server: the Host check, the API key, JSON-only writes, the body limit.

Loopback is no trust boundary against a browser: any web page can send a "simple" POST
(``text/plain``, or no body at all) to ``127.0.0.1``, and DNS rebinding points a page's own
name at the server, so that its requests carry that name in ``Host``. Hence, in this order:

1. ``Host`` must be a name the server is reached by (``HostPolicy``), else 403;
2. with an API key, every request but the greeting carries it, else 401;
3. a POST, and any other request that may change state (every method but GET, HEAD,
   OPTIONS) and has a body, is ``application/json``, which a page can only send after a
   CORS preflight, else 415 (a page may send a bodyless POST without one; other methods,
   such as a ``DELETE`` without a body, always need one);
4. a body over the limit is 413 before the application reads it.

Websockets (the SDK protocol) are not bound by the same-origin policy: any page may open one
to ``127.0.0.1``. So an upgrade that carries an ``Origin`` (only browsers send one) must come
from this machine's own pages, unless ``--cors`` opened the server to every page. The API
key of an upgrade may instead come in the SDK's auth handshake (``sdk.protocol``): the
official client cannot add headers.

Pure ASGI and the standard library, so that ``lms server start`` can check its flags with
``bind_refusal`` without importing Starlette.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmscli.server.errors import APIError

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

GREETING_PATH = "/lmstudio-greeting"  # clients probe it to find the server: always open
DEFAULT_MAX_BODY_MB = 32
ALLOWED_HOSTS_ENV = "LMS_ALLOWED_HOSTS"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# set on a websocket scope whose upgrade carried the right API key; without it, the
# handshake must carry the key
KEY_CHECKED_SCOPE = "lmscli.api_key_checked"


# -- start-up policy -----------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind_refusal(host: str, api_key: str | None, allow_unauthenticated: bool) -> str | None:
    """Why the server must not listen on ``host`` as configured, or None when it may."""
    if api_key or allow_unauthenticated or is_loopback(host):
        return None
    return (f"Refusing to listen on {host} without an API key: anyone on the network could "
            "use the server. Pass --api-key (or set LMS_API_KEY), or --allow-unauthenticated.")


def env_allowed_hosts() -> list[str]:
    raw = os.environ.get(ALLOWED_HOSTS_ENV, "")
    return [h.strip() for h in raw.split(",") if h.strip()]


def max_body_bytes(mb: float) -> int:
    return int(mb * 1024 * 1024)


# -- the Host rule -------------------------------------------------------------------------

def host_name(header: str) -> str:
    """``Host`` without its port, lower-cased; an IPv6 literal keeps no brackets."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class HostPolicy:
    """The ``Host`` values a request may carry.

    An IP literal is always fine: DNS rebinding needs a name the attacker controls. So are
    ``localhost``, the bound name, ``--allowed-host`` names (``*``: any) and, on a network
    bind, this machine's name. A network bind with an API key takes any name: the key, which a
    rebinding page does not have, already guards it.
    """

    names: frozenset[str]
    any_name: bool = False

    @classmethod
    def for_bind(cls, bind: str, allowed: Iterable[str] = (), keyed: bool = False
                 ) -> HostPolicy:
        names = {"localhost", host_name(bind)} | {host_name(a) for a in allowed}
        network = not is_loopback(bind)
        if network:
            machine = socket.gethostname().lower()
            names |= {machine, machine.partition(".")[0]}
        return cls(frozenset(names), any_name="*" in names or (network and keyed))

    def allows(self, header: str | None) -> bool:
        if header is None:
            return True  # browsers always send Host; a client without one is not a web page
        name = host_name(header)
        return self.any_name or name in self.names or is_ip_literal(name)

    def allows_origin(self, origin: str) -> bool:
        """A page's ``Origin``: one of the names the server is reached by, or loopback. Not
        any IP literal, as for ``Host``: a page served from any address sends its own."""
        _, sep, rest = origin.strip().partition("://")
        name = host_name(rest.partition("/")[0]) if sep else ""
        return bool(name) and (name in self.names or is_loopback(name))


# -- the middleware ------------------------------------------------------------------------

class BodyTooLarge(APIError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"The request body is larger than the server's limit of "
                         f"{limit / 1024 / 1024:g} MB (lms server start --max-body-mb).",
                         code="request_too_large")


@dataclass(frozen=True)
class Guard:
    hosts: HostPolicy
    api_key: str | None = None
    max_body: int = max_body_bytes(DEFAULT_MAX_BODY_MB)
    any_origin: bool = False  # --cors: web pages from anywhere may open websockets


class GuardMiddleware:
    """Applies ``Guard`` to every HTTP request and websocket; a refusal takes the error body
    of the API family the request was for (``error_body``, from the app's route table)."""

    def __init__(self, app: ASGIApp, guard: Guard,
                 error_body: Callable[[Scope, APIError], dict[str, Any]]) -> None:
        self.app = app
        self.guard = guard
        self.error_body = error_body
        self._key = guard.api_key.encode() if guard.api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await _refuse(scope, receive, send, refusal, self.error_body(scope, refusal))
            return
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return
        await self._limited(scope, receive, send)

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = _headers(scope)
        host = headers.get(b"host")
        if not self.guard.hosts.allows(None if host is None else host.decode("latin-1")):
            name = host_name(host.decode("latin-1")) if host else ""
            return APIError(403, f"Host {name!r} is not allowed (DNS rebinding protection). "
                            f"Start the server with --allowed-host {name} to allow it.",
                            code="host_not_allowed")
        if scope["type"] == "websocket":
            return self._websocket_refusal(scope, headers)
        if self._key is not None and scope["path"] != GREETING_PATH:
            refusal = _key_refusal(headers, self._key)
            if refusal is not None:
                return refusal
        if scope["type"] == "http" and _must_be_json(scope["method"], headers) \
                and not _is_json(headers.get(b"content-type")):
            return APIError(415, "Send the request body as JSON, with the header "
                            "'Content-Type: application/json'.", code="unsupported_media_type")
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.guard.max_body:
            return BodyTooLarge(self.guard.max_body)
        return None

    def _websocket_refusal(self, scope: Scope, headers: dict[bytes, bytes]) -> APIError | None:
        origin = headers.get(b"origin")
        if origin is not None and not self.guard.any_origin \
                and not self.guard.hosts.allows_origin(origin.decode("latin-1")):
            return APIError(403, "Websockets from other sites' web pages are refused; start "
                            "the server with --cors to allow them.", code="origin_not_allowed")
        if self._key is None:
            return None
        offered = b"authorization" in headers or b"x-api-key" in headers
        if offered:  # a wrong key is refused now; none at all is asked for in the handshake
            refusal = _key_refusal(headers, self._key)
            if refusal is not None:
                return refusal
        scope[KEY_CHECKED_SCOPE] = offered
        return None

    async def _limited(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the body as it streams in: a chunked request has no Content-Length."""
        seen = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.guard.max_body:
                    raise BodyTooLarge(self.guard.max_body)
            return message

        async def noting_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, noting_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await _refuse(scope, receive, send, exc, self.error_body(scope, exc))


def _headers(scope: Scope) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        headers.setdefault(name.lower(), value)  # the first of repeated headers counts
    return headers


def _key_refusal(headers: dict[bytes, bytes], key: bytes) -> APIError | None:
    offered = []
    scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
    if scheme.lower() == b"bearer":
        offered.append(token.strip())
    if b"x-api-key" in headers:  # what Anthropic clients send
        offered.append(headers[b"x-api-key"].strip())
    if not offered:
        return APIError(401, "This server needs an API key: send 'Authorization: Bearer "
                        "<key>' (lms and lmscli read it from LMS_API_KEY).",
                        code="missing_api_key")
    # compare every offer, in constant time, so that timing tells nothing about the key
    if not any([hmac.compare_digest(o, key) for o in offered]):
        return APIError(401, "Incorrect API key provided.", code="invalid_api_key")
    return None


def _must_be_json(method: str, headers: dict[bytes, bytes]) -> bool:
    if method in SAFE_METHODS:
        return False
    has_body = b"transfer-encoding" in headers or \
        headers.get(b"content-length", b"0").strip() not in (b"0", b"")
    return method == "POST" or has_body


def _is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    return content_type.partition(b";")[0].strip().lower() == b"application/json"


async def _refuse(scope: Scope, receive: Receive, send: Send, error: APIError,
                  data: dict[str, Any]) -> None:
    """Answer with ``error`` (its body as ``data``) before the app sees the request."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect; closing before accepting answers 403
        await send({"type": "websocket.close", "code": 1008})
        return
    body = json.dumps(data).encode()
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(body)).encode())]
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="lmscli"'))
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
