"""Running the server process: bind, advertise in the state file, serve, clean up."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from lmscli import serverstate
from lmscli.engine.promptcache import DEFAULT_DISK_BYTES, parse_size
from lmscli.errors import ExitCode
from lmscli.server.security import (
    DEFAULT_MAX_BODY_MB,
    bind_refusal,
    env_allowed_hosts,
    is_loopback,
)


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on connections of a socket that says
    # it is TCP. Without it, a reply's first chunk after its headers can wait ~40 ms for the
    # client's delayed ACK (Nagle), on every request that follows another on one connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


# Where lmstudio-python (≥1.5) looks for a server when given no host: the greeting on each, in
# this order. LM Studio serves its SDK API on the first free one; so does lmscli, on loopback.
SDK_PORTS = (41343, 52993, 16141, 39414, 22931)


def bind_sdk_port(host: str, port: int) -> socket.socket | None:
    """A loopback socket on the first free SDK port; None when the main port is one already
    (on loopback) or all are taken."""
    if port in SDK_PORTS and is_loopback(host):
        return None
    for candidate in SDK_PORTS:
        try:
            return bind("127.0.0.1", candidate)
        except OSError:
            continue
    return None


def serve(host: str, port: int, cors: bool = False, engine_name: str | None = None,
          announce: bool = False, *, api_key: str | None = None,
          allowed_hosts: Sequence[str] = (), max_body_mb: float = DEFAULT_MAX_BODY_MB,
          allow_unauthenticated: bool = False, parallel: int = 4, max_queue: int = 64,
          sdk_port: bool = True, cache_ram: int | None = None, cache_dir: str | None = None,
          cache_disk: int | None = None, allow_local_mcp: bool = False) -> int:
    """Serve until stopped; returns the process exit code. ``api_key`` None reads it from
    LMS_API_KEY (or LM_API_TOKEN); LMS_ALLOWED_HOSTS adds to ``allowed_hosts``. With
    ``sdk_port``, the server also listens where the lmstudio SDK looks for it."""
    import uvicorn

    from lmscli.engine import get_engine
    from lmscli.server.app import Settings, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    api_key = api_key or serverstate.env_api_key()
    refusal = bind_refusal(host, api_key, allow_unauthenticated)
    if refusal:
        print(refusal, file=sys.stderr, flush=True)
        return ExitCode.UNSAFE_BIND
    try:
        sock = bind(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"Port {port} is already in use.", file=sys.stderr, flush=True)
            return ExitCode.PORT_IN_USE
        print(f"Could not bind {host}:{port}: {exc.strerror}", file=sys.stderr, flush=True)
        return ExitCode.BIND_FAILED
    port = sock.getsockname()[1]
    sockets = [sock]
    sdk_sock = bind_sdk_port(host, port) if sdk_port else None
    if sdk_sock is not None:
        sockets.append(sdk_sock)
    engine = get_engine(engine_name)
    config = uvicorn.Config(None, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    settings = Settings(host=host, port=port, cors=cors, api_key=api_key,
                        allowed_hosts=(*allowed_hosts, *env_allowed_hosts()),
                        max_body_mb=max_body_mb, parallel=parallel, max_queue=max_queue,
                        sdk_port=sdk_sock.getsockname()[1] if sdk_sock else None,
                        cache_ram=cache_ram, cache_dir=Path(cache_dir) if cache_dir else None,
                        cache_disk=DEFAULT_DISK_BYTES if cache_disk is None else cache_disk,
                        allow_local_mcp=allow_local_mcp)
    config.app = create_app(engine, settings, server)
    pid = os.getpid()
    serverstate.write_state(serverstate.ServerState(pid, host, port, time.time(),
                                                    serverstate.process_start(pid)))
    if announce:
        print(f"Success! Server is now running on port {port}", file=sys.stderr, flush=True)
    else:
        print(f"lmscli server listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.run(sockets=sockets)
    finally:
        serverstate.clear_state(pid)
    return 0


def positive_mb(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be a number of megabytes above 0")
    return value


def size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be between {low} and {high}")
        return value

    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmscli.server")
    parser.add_argument("--host", default=serverstate.default_host())
    parser.add_argument("--port", type=int, default=serverstate.DEFAULT_PORT)
    parser.add_argument("--cors", action="store_true")
    parser.add_argument("--engine", default=None)
    # prefer LMS_API_KEY: a command line is visible to every user of the machine
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--allow-unauthenticated", action="store_true")
    parser.add_argument("--allow-local-mcp", action="store_true")
    parser.add_argument("--allowed-host", action="append", default=[], dest="allowed_hosts")
    parser.add_argument("--max-body-mb", type=positive_mb, default=DEFAULT_MAX_BODY_MB)
    parser.add_argument("--parallel", type=bounded_int(1, 64), default=4)
    parser.add_argument("--max-queue", type=bounded_int(0, 100_000), default=64)
    parser.add_argument("--cache-ram", type=size, default=None)
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument("--cache-disk", type=size, default=None)
    parser.add_argument("--no-sdk-port", action="store_false", dest="sdk_port",
                        help="don't also listen on a port where the lmstudio SDK looks")
    args = parser.parse_args(argv)
    return serve(args.host, args.port, args.cors, args.engine, api_key=args.api_key,
                 allowed_hosts=args.allowed_hosts, max_body_mb=args.max_body_mb,
                 allow_unauthenticated=args.allow_unauthenticated, parallel=args.parallel,
                 allow_local_mcp=args.allow_local_mcp,
                 max_queue=args.max_queue, sdk_port=args.sdk_port, cache_ram=args.cache_ram,
                 cache_dir=args.cache_dir, cache_disk=args.cache_disk)
