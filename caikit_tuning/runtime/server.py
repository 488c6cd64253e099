"""Start the caikit runtime for caikit_tuning, bound to loopback unless configured otherwise.

caikit 0.29 binds gRPC to [::], HTTP to 0.0.0.0 and metrics to every interface; here
all three listen on `runtime.bind_host` (default 127.0.0.1), and beyond loopback only
with TLS or API keys. Both servers get a guard in front of every call (http_guard,
grpc_guard), HTTP streams let go of their thread when the client does (streaming),
OpenAI-compatible routes sit beside caikit's (openai_api),
`/health` answers 503 while no inference thread is free, and shutdown ends within
`runtime.shutdown_timeout_seconds` whatever the clients do.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import faulthandler
import functools
import os
import signal
import threading
from pathlib import Path

import alog

log = alog.use_channel("SERVE")
# /health waits this long for a free inference thread before it says 503.
READINESS_SECONDS = 1.0
# How often the main thread wakes to run a SIGTERM handler (see serve()).
SIGNAL_POLL_SECONDS = 0.2

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
def _grpc_bound_to(host: str, interceptor):
    """caikit's grpc.server(...) call, listening on `host`, with `interceptor` first."""
    import grpc

    make_server = grpc.server

    def bound_server(*args, **kwargs):
        kwargs["interceptors"] = (interceptor, *(kwargs.get("interceptors") or ()))
        return _BoundServer(make_server(*args, **kwargs), host)

    grpc.server = bound_server
    try:
        yield
    finally:
        grpc.server = make_server


def serve(config_file: str | None = None, host: str | None = None) -> None:
    """Run the gRPC and HTTP servers until SIGINT / SIGTERM."""
    import caikit
    from prometheus_client import start_http_server

    import caikit_tuning  # noqa: F401  (configures caikit with the library defaults)

    from . import guards
    from .settings import ServingSettings

    if config_file:
        path = str(Path(config_file).resolve())
        if not Path(path).is_file():
            raise SystemExit(f"runtime config {path} does not exist")
        caikit.configure(path)
        # Training worker processes read the same file through the environment.
        os.environ["CONFIG_FILES"] = path

    # caikit sizes its shared thread pool when this module is first imported: only
    # now, after the runtime config, does runtime.server_thread_pool_size apply.
    import caikit.runtime.server_base as server_base

    config = caikit.get_config()
    try:
        settings = ServingSettings.from_config(config, host)
    except ValueError as err:
        raise SystemExit(f"caikit_tuning runtime: {err}") from None
    host = settings.host
    guards.install()
    server_base.start_http_server = functools.partial(start_http_server, addr=host)

    servers = []
    if config.runtime.grpc.enabled:
        from caikit.runtime.grpc_server import RuntimeGRPCServer

        from .grpc_guard import GuardInterceptor

        with _grpc_bound_to(host, GuardInterceptor(settings)):
            grpc_server = RuntimeGRPCServer()
        grpc_server.start(blocking=False)
        servers.append(grpc_server)
        log.info("gRPC listening on %s:%s", host, config.runtime.grpc.port)
    if config.runtime.http.enabled:
        servers.append(_start_http(settings))
        log.info("HTTP listening on %s:%s", host, config.runtime.http.port)
    print(f"caikit_tuning runtime ready on {host}", flush=True)

    # `kill -USR1 <pid>` writes every thread's stack to stderr: for a server that hangs.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    # Wait in short slices: the kernel may deliver SIGTERM to any thread (gRPC's,
    # torch's), and then Python runs the handler only once the main thread wakes.
    # An unbounded wait would never wake, and the server would never stop.
    while not stop.wait(SIGNAL_POLL_SECONDS):
        pass
    _shut_down(servers, settings.shutdown_timeout_seconds)


def patch_http_server() -> None:
    """What caikit's HTTP server does differently here (once): streams that let go of
    their thread when the client does, readiness at /health, and the API as the
    ecosystem's clients read it (runtime.http_api)."""
    import caikit.runtime.http_server.http_server as caikit_http
    from caikit.runtime.http_server import RuntimeHTTPServer

    from .http_api import plain_event, shape_for_clients
    from .streaming import async_iterate

    if getattr(RuntimeHTTPServer, "_caikit_tuning_patched", False):
        return
    # caikit's streaming handler looks these names up at every request.
    caikit_http.async_wrap_iter = async_iterate
    caikit_http.ServerSentEvent = plain_event
    RuntimeHTTPServer._health_check = staticmethod(_readiness)
    patch_spec = RuntimeHTTPServer._patch_openapi_spec

    def shaped_spec(self) -> None:
        patch_spec(self)
        shape_for_clients(self.app.openapi_schema)

    RuntimeHTTPServer._patch_openapi_spec = shaped_spec
    RuntimeHTTPServer._caikit_tuning_patched = True


def _start_http(settings):
    from caikit.runtime.http_server import RuntimeHTTPServer

    from .http_guard import RequestGuard, short_validation_errors
    from .http_protocol import GuardedH11Protocol
    from .openai_api import add_openai_routes

    GuardedH11Protocol.limits = settings.limits
    patch_http_server()
    http_server = RuntimeHTTPServer()
    http_server.server.config.host = settings.host
    http_server.app.add_middleware(RequestGuard, settings=settings)
    short_validation_errors(http_server.app)
    add_openai_routes(http_server.app, http_server.thread_pool)
    http_server.start(blocking=False)
    return http_server


async def _readiness():
    """200 "OK" while inference can be served: an inference thread is free within a
    second. 503 otherwise (every thread busy), so a balancer sends requests elsewhere."""
    from caikit.runtime.server_base import ServerThreadPool
    from fastapi.responses import PlainTextResponse

    probe = ServerThreadPool.pool.submit(lambda: None)
    try:
        await asyncio.wait_for(asyncio.wrap_future(probe), READINESS_SECONDS)
    except (TimeoutError, concurrent.futures.CancelledError):
        probe.cancel()
        return PlainTextResponse("NOT READY: every inference thread is busy", status_code=503)
    return PlainTextResponse("OK")


def _shut_down(servers: list, timeout: float) -> None:
    """Stop the servers together; whatever is still running after `timeout` seconds
    (a thread stuck on a client, a slow stream) does not keep the process alive."""
    from ..generation.batching import close_engines

    def force_exit() -> None:
        log.warning("shutdown took over %ss: exiting now", timeout)
        os._exit(0)

    watchdog = threading.Timer(timeout, force_exit)
    watchdog.daemon = True
    watchdog.start()
    stoppers = [threading.Thread(target=server.stop, daemon=True) for server in servers]
    for stopper in stoppers:
        stopper.start()
    for stopper in stoppers:
        stopper.join()
    close_engines()
