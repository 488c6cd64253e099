"""The HTTP server's front door: checks every request before caikit's handlers see it.

In order: the Host header is one this server answers (no DNS rebinding from a browser
when it listens on loopback), the caller holds an API key when keys are configured,
there are not too many headers, and the body is within its size and time limits and
is UTF-8. Each refusal is a JSON error with a status code and the reason; nothing
refused reaches a handler or holds a thread.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from .settings import ServingSettings

# Probes answer without a key: they reveal nothing and must work for orchestrators.
OPEN_PATHS = ("/health",)
EXCERPT_CHARS = 120


class RequestGuard:
    """ASGI middleware enforcing ServingSettings on every HTTP request."""

    def __init__(self, app, settings: ServingSettings):
        self.app = app
        self.settings = settings
        self._keys = [key.encode() for key in settings.api_keys]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        # OpenAI's clients read refusals as OpenAI's error object.
        reject = functools.partial(refuse, openai=str(scope.get("path", "")).startswith("/v1/"))
        limits = self.settings.limits
        headers = scope.get("headers") or []
        if len(headers) > limits.max_headers:
            return await reject(
                send,
                431,
                f"the request has {len(headers)} headers; the server takes at most {limits.max_headers}.",
            )
        host = _header(headers, b"host")
        if self.settings.allowed_hosts and _host_name(host) not in self.settings.allowed_hosts:
            return await reject(
                send,
                421,
                f"this server does not answer for host {excerpt(host.decode(errors='replace'))!r}; "
                "the operator can add it to runtime.http.allowed_hosts.",
            )
        if self._keys and scope.get("path") not in OPEN_PATHS and not self._authorized(headers):
            return await reject(
                send,
                401,
                "a valid API key is required: send it as 'Authorization: Bearer <key>'.",
                [(b"www-authenticate", b"Bearer")],
            )
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = _header(headers, b"content-length")
        if length.isdigit() and int(length) > limits.max_body_bytes:
            return await reject(send, 413, _too_large(int(length), limits.max_body_bytes))
        try:
            body = await asyncio.wait_for(
                _read_body(receive, limits.max_body_bytes), limits.body_timeout_seconds
            )
        except TimeoutError:
            return await reject(send, 408, "the request body took too long to arrive.")
        except _BodyTooLarge as err:
            return await reject(send, 413, str(err))
        if body is None:  # the client went away
            return None
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            return await reject(
                send, 400, f"the request body is not valid UTF-8 (byte {err.start})."
            )
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    def _authorized(self, headers) -> bool:
        value = _header(headers, b"authorization")
        scheme, _, token = value.partition(b" ")
        if scheme.lower() != b"bearer":
            token = _header(headers, b"x-api-key")
        token = token.strip()
        # Compare with every key, in constant time, so timing says nothing about them.
        return bool(token) and any([hmac.compare_digest(token, key) for key in self._keys])


class _BodyTooLarge(ValueError):
    pass


async def _read_body(receive, limit: int) -> bytes | None:
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _BodyTooLarge(_too_large(size, limit, at_least=True))
        chunks.append(chunk)
        more = message.get("more_body", False)
    return b"".join(chunks)


def _too_large(size: int, limit: int, at_least: bool = False) -> str:
    return (
        f"the request body is {'over ' if at_least else ''}{size} bytes; the server takes at "
        f"most {limit} (runtime.http.limits.max_body_bytes)."
    )


def _header(headers, name: bytes) -> bytes:
    return next((value for key, value in headers if key == name), b"")


def _host_name(host: bytes) -> str:
    """`example.com:8080` -> `example.com`; `[::1]:8080` -> `::1`."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


async def refuse(send, status: int, details: str, extra_headers=(), openai: bool = False) -> None:
    """Answer `status` with a JSON error (caikit's shape, or OpenAI's error object). The
    connection stays open, so uvicorn reads and discards whatever body is still coming
    (the client then sees this answer rather than a reset); a client too slow to finish
    its request is dropped."""
    error = {"details": details, "code": status}
    if openai:
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        error = {"error": {"message": details, "type": kind, "param": None, "code": status}}
    payload = json.dumps(error).encode()
    close = [(b"connection", b"close")] if status == 408 else []
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                *close,
                *extra_headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


def short_validation_errors(app: FastAPI) -> None:
    """caikit's 422 answer echoes each invalid input whole (an 8 MB field comes back
    8 MB long): quote at most an excerpt of it."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError) -> JSONResponse:
        errors = [_short(error) for error in exc.errors()]
        details = errors[0].get("msg", "invalid request") if errors else "invalid request"
        location = ".".join(str(part) for part in (errors[0].get("loc") or ())) if errors else ""
        return JSONResponse(
            status_code=422,
            content=jsonable_encoder(
                {
                    "details": f"{location}: {details}" if location else details,
                    "additional_info": errors,
                    "code": 422,
                }
            ),
        )


def _short(error: dict) -> dict:
    error = {key: value for key, value in error.items() if key not in ("ctx", "url")}
    if "input" in error:
        error["input"] = excerpt(
            error["input"]
            if isinstance(error["input"], str)
            else json.dumps(jsonable_encoder(error["input"]))
        )
    if isinstance(error.get("msg"), str):
        error["msg"] = excerpt(error["msg"], 300)
    return error
