"""The gRPC server's front door: one interceptor in front of every RPC.

- With API keys configured, a call must carry `authorization: Bearer <key>` (or
  `x-api-key`) in its metadata; health checks and reflection stay open.
- A request that is not a valid protobuf message is INVALID_ARGUMENT naming the RPC
  (grpc answers INTERNAL "Exception deserializing request!").
- An error raised while a response stream runs gets its proper status (a bad value is
  INVALID_ARGUMENT) instead of UNKNOWN "Exception iterating responses".
- When a call ends early (the client cancelled or went away), the generation streams
  it started are cancelled at once, freeing their batch rows.
"""

from __future__ import annotations

import hmac
import logging

import grpc
from caikit.runtime.types.caikit_runtime_exception import CaikitRuntimeException

from ..generation.stream import TokenStream, watch_streams
from .guards import public_text
from .http_guard import excerpt
from .settings import ServingSettings

log = logging.getLogger(__name__)

OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


class _Undecodable:
    def __init__(self, error: Exception):
        self.error = error


class GuardInterceptor(grpc.ServerInterceptor):
    def __init__(self, settings: ServingSettings):
        self._keys = [key.encode() for key in settings.api_keys]

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if (
            self._keys
            and not method.startswith(OPEN_METHOD_PREFIXES)
            and not self._authorized(handler_call_details.invocation_metadata)
        ):
            return _refusal(
                grpc.StatusCode.UNAUTHENTICATED,
                "a valid API key is required: send it in the `authorization` metadata as "
                "'Bearer <key>'.",
            )
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:
            return handler
        deserialize = _lenient(handler.request_deserializer)
        if handler.response_streaming:
            return handler._replace(
                request_deserializer=deserialize,
                unary_stream=_streaming(handler.unary_stream, method),
            )
        return handler._replace(
            request_deserializer=deserialize, unary_unary=_unary(handler.unary_unary, method)
        )

    def _authorized(self, metadata) -> bool:
        values = dict(metadata or ())
        scheme, _, token = str(values.get("authorization", "")).partition(" ")
        if scheme.lower() != "bearer":
            token = str(values.get("x-api-key", ""))
        token = token.strip().encode()
        return bool(token) and any([hmac.compare_digest(token, key) for key in self._keys])


def _lenient(deserialize):
    if deserialize is None:
        return None

    def lenient(data: bytes):
        try:
            return deserialize(data)
        except Exception as err:  # noqa: BLE001  (answered as INVALID_ARGUMENT below)
            return _Undecodable(err)

    return lenient


def _check_request(request, context, method: str) -> None:
    if isinstance(request, _Undecodable):
        context.abort(
            grpc.StatusCode.INVALID_ARGUMENT,
            f"the request is not a valid protobuf message for {method} "
            f"({excerpt(str(request.error))}).",
        )


def _watched(context) -> list[TokenStream]:
    """Streams the call starts; cancelled when the call ends (on success, harmlessly)."""
    streams: list[TokenStream] = []
    context.add_callback(lambda: [stream.cancel() for stream in list(streams)])
    return streams


def _unary(behavior, method: str):
    def unary(request, context):
        _check_request(request, context, method)
        with watch_streams(_watched(context)):
            return behavior(request, context)

    return unary


def _streaming(behavior, method: str):
    def streaming(request, context):
        _check_request(request, context, method)
        with watch_streams(_watched(context)):
            responses = behavior(request, context)
        try:
            yield from responses
        except Exception as err:
            if context.code() is not None:  # the call was already ended (context.abort)
                raise
            code, details = _status_of(err)
            if code == grpc.StatusCode.INTERNAL:
                log.error("stream for %s failed: %s", method, err, exc_info=True)
            context.abort(code, details)

    return streaming


def _status_of(err: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(err, CaikitRuntimeException):
        return err.status_code, err.message
    if isinstance(err, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT, public_text(str(err))
    return grpc.StatusCode.INTERNAL, f"generation failed: {excerpt(public_text(str(err)))}"


def _refusal(code: grpc.StatusCode, details: str):
    def refuse(request, context):
        context.abort(code, details)

    return grpc.unary_unary_rpc_method_handler(refuse)
