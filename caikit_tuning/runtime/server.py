"""Start the caikit runtime for caikit_tuning, bound to loopback unless configured otherwise.

caikit 0.29 binds gRPC to [::], HTTP to 0.0.0.0 and metrics to every interface; here
all three listen on `runtime.bind_host` (default 127.0.0.1).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
from pathlib import Path

import alog

log = alog.use_channel("SERVE")

DEFAULT_HOST = "127.0.0.1"


class _BoundServer:
    """A grpc.Server whose ports listen on `host` instead of every interface."""

    def __init__(self, server, host: str):
        self._server = server
        self._host = host

    def _address(self, address: str) -> str:
        if address.startswith("[::]:"):
            host = f"[{self._host}]" if ":" in self._host else self._host
            return f"{host}:{address.rsplit(':', 1)[1]}"
        return address

    def add_insecure_port(self, address: str) -> int:
        return self._server.add_insecure_port(self._address(address))

    def add_secure_port(self, address: str, credentials) -> int:
        return self._server.add_secure_port(self._address(address), credentials)

    def __getattr__(self, name):
        return getattr(self._server, name)


@contextlib.contextmanager
def _grpc_bound_to(host: str):
    import grpc

    make_server = grpc.server

    def bound_server(*args, **kwargs):
        return _BoundServer(make_server(*args, **kwargs), host)

    grpc.server = bound_server
    try:
        yield
    finally:
        grpc.server = make_server


def serve(config_file: str | None = None, host: str | None = None) -> None:
    """Run the gRPC and HTTP servers until SIGINT / SIGTERM."""
    import caikit
    import caikit.runtime.server_base as server_base
    from prometheus_client import start_http_server

    import caikit_tuning  # noqa: F401  (configures caikit with the library defaults)

    from . import guards

    if config_file:
        path = str(Path(config_file).resolve())
        if not Path(path).is_file():
            raise SystemExit(f"runtime config {path} does not exist")
        caikit.configure(path)
        # Training worker processes read the same file through the environment.
        os.environ["CONFIG_FILES"] = path

    config = caikit.get_config()
    host = host or config.runtime.get("bind_host") or DEFAULT_HOST
    guards.install()
    server_base.start_http_server = functools.partial(start_http_server, addr=host)

    servers = []
    if config.runtime.grpc.enabled:
        from caikit.runtime.grpc_server import RuntimeGRPCServer

        with _grpc_bound_to(host):
            grpc_server = RuntimeGRPCServer()
        grpc_server.start(blocking=False)
        servers.append(grpc_server)
        log.info("gRPC listening on %s:%s", host, config.runtime.grpc.port)
    if config.runtime.http.enabled:
        from caikit.runtime.http_server import RuntimeHTTPServer

        http_server = RuntimeHTTPServer()
        http_server.server.config.host = host
        http_server.app.add_middleware(guards.Utf8BodyGuard)
        http_server.start(blocking=False)
        servers.append(http_server)
        log.info("HTTP listening on %s:%s", host, config.runtime.http.port)
    print(f"caikit_tuning runtime ready on {host}", flush=True)

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    for server in reversed(servers):
        server.stop()
