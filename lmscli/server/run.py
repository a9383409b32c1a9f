"""Running the server process: bind, advertise in the state file, serve, clean up."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import socket
import sys
import time

from lmscli import serverstate

EXIT_PORT_IN_USE = 3
EXIT_BIND_FAILED = 4


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def serve(host: str, port: int, cors: bool = False, engine_name: str | None = None,
          announce: bool = False) -> int:
    """Serve until stopped; returns the process exit code."""
    import uvicorn

    from lmscli.engine import get_engine
    from lmscli.server.app import Settings, create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        sock = bind(host, port)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            print(f"Port {port} is already in use.", file=sys.stderr, flush=True)
            return EXIT_PORT_IN_USE
        print(f"Could not bind {host}:{port}: {exc.strerror}", file=sys.stderr, flush=True)
        return EXIT_BIND_FAILED
    port = sock.getsockname()[1]
    engine = get_engine(engine_name)
    config = uvicorn.Config(None, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    config.app = create_app(engine, Settings(host=host, port=port, cors=cors), server)
    serverstate.write_state(serverstate.ServerState(os.getpid(), host, port, time.time()))
    if announce:
        print(f"Success! Server is now running on port {port}", file=sys.stderr, flush=True)
    else:
        print(f"lmscli server listening on http://{host}:{port}", file=sys.stderr, flush=True)
    try:
        server.run(sockets=[sock])
    finally:
        serverstate.clear_state(os.getpid())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmscli.server")
    parser.add_argument("--host", default=serverstate.default_host())
    parser.add_argument("--port", type=int, default=serverstate.DEFAULT_PORT)
    parser.add_argument("--cors", action="store_true")
    parser.add_argument("--engine", default=None)
    args = parser.parse_args(argv)
    return serve(args.host, args.port, args.cors, args.engine)
