"""OpenAI-compatible routes on the runtime's HTTP server: `/v1/models`,
`/v1/completions` and `/v1/chat/completions`.

They serve the same models as the caikit routes, through the same path: the model
manager loads a model on its first request (a model trained after start-up is
reachable by name at once), generation runs on the server's inference threads and
in the batching engine beside the caikit requests, and the front door (RequestGuard:
API keys, hosts, size and time limits) checks every request first. Streams let go of
their thread and their batch row when the client goes away (streaming.async_iterate).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import alog
from caikit.interfaces.nlp.data_model import FinishReason
from caikit.runtime.names import STATUS_CODE_TO_HTTP
from caikit.runtime.types.caikit_runtime_exception import CaikitRuntimeException
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..generation.api import request_settings
from ..generation.settings import MAX_COUNT
from ..generation.stream import TokenEvent, TokenStream, chat_conversation, context_length
from .guards import public_text
from .openai_models import list_models, served_model, unknown_model
from .openai_requests import (
    OpenAIError,
    OpenAIRequest,
    from_settings_error,
    parse_chat,
    parse_completion,
)
from .streaming import async_iterate

log = alog.use_channel("OPENAI")

# A seq2seq model has no context length that ends its answer: chat answers stop here
# unless the client sets max_tokens.
SEQ2SEQ_CHAT_MAX_TOKENS = 512
_FINISH = {
    FinishReason.EOS_TOKEN: "stop",
    FinishReason.STOP_SEQUENCE: "stop",
    FinishReason.MAX_TOKENS: "length",
    FinishReason.TOKEN_LIMIT: "length",
    FinishReason.TIME_LIMIT: "length",
}


def add_openai_routes(app: FastAPI, pool) -> None:
    """The /v1 routes, run on `pool` (the server's inference threads)."""

    async def on_pool(function, *args):
        return await asyncio.get_running_loop().run_in_executor(pool, function, *args)

    @app.get("/v1/models", include_in_schema=False)
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": await on_pool(list_models)})

    @app.get("/v1/models/{model_id:path}", include_in_schema=False)
    async def model(model_id: str) -> JSONResponse:
        found = [m for m in await on_pool(list_models) if m["id"] == model_id]
        if not found:
            return _error(unknown_model(model_id))
        return JSONResponse(found[0])

    async def generate(request: Request, parse) -> Any:
        # One trip to an inference thread per request, as the caikit routes make: the
        # model lookup, the start and (unary) the whole answer.
        try:
            openai_request = parse(await _json_body(request))
            if not openai_request.stream:
                return JSONResponse(await on_pool(answer, openai_request))
            reply, runs = await on_pool(start, openai_request)
        except Exception as err:  # noqa: BLE001  (answered as OpenAI's error object)
            return _error(_as_openai_error(err))
        return StreamingResponse(
            _events(reply, runs, pool),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    @app.post("/v1/completions", include_in_schema=False)
    async def completions(request: Request):
        return await generate(request, parse_completion)

    @app.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions(request: Request):
        return await generate(request, parse_chat)


def start(request: OpenAIRequest) -> tuple[Reply, list[Run]]:
    module = served_model(request.model)
    return Reply(request, module.generator.tokenizer), start_runs(module, request)


def answer(request: OpenAIRequest) -> dict:
    reply, runs = start(request)
    try:
        return reply.whole(runs)
    finally:  # one answer that fails (non-finite scores) ends the others too
        for run in runs:
            run.events.cancel()


# ------------------------------------------------------------------ generating


@dataclass
class Run:
    """One answer being generated: the `index`-th choice."""

    index: int
    # Which of the request's prompts it answers.
    prompt: int
    prompt_tokens: int
    events: TokenStream
    echo: str = ""


def start_runs(module, request: OpenAIRequest) -> list[Run]:
    """Queue every answer of `request` at once, so they share the batch; if one cannot
    start, none is left running."""
    generator = module.generator
    if request.chat:
        inputs = [(_conversation(module, request.messages), "")]
    else:
        inputs = [
            (module.model_input(prompt), prompt if request.echo else "")
            for prompt in request.prompts
        ]
    runs: list[Run] = []
    try:
        for number, (text, echo) in enumerate(inputs):
            for choice in range(request.n):
                values = request.choice_settings(choice)
                if values["max_new_tokens"] is None:
                    values["max_new_tokens"] = _chat_max_tokens(generator.model)
                try:
                    settings = request_settings(text, values)
                except ValueError as err:  # WrongType is one too
                    raise from_settings_error(err) from None
                prompt, events = generator.start(text, settings, rendered=request.chat)
                runs.append(Run(len(runs), number, len(prompt.ids), events, echo))
    except BaseException:
        for run in runs:
            run.events.cancel()
        raise
    return runs


def _conversation(module, messages: tuple[dict, ...]) -> str:
    """The conversation as the model sees it: the last user turn through the model's
    own input (a prompt-tuned model's verbalizer, as at training), the whole through
    the tokenizer's chat template."""
    messages = [dict(message) for message in messages]
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if users:
        last = messages[users[-1]]
        last["content"] = module.model_input(last["content"])
    try:
        return chat_conversation(module.generator.tokenizer, messages)
    except ValueError as err:
        raise OpenAIError(400, f"{err} (use /v1/completions)", "messages") from None


def _chat_max_tokens(model) -> int:
    """Chat answers without max_tokens run to the end of the model's context."""
    if model.config.is_encoder_decoder or context_length(model) is None:
        return SEQ2SEQ_CHAT_MAX_TOKENS
    return MAX_COUNT


class Merged(Iterator):
    """The runs' events as (run, event), taking each run's next event in turn; they
    advance together in the batch, so waiting on one loses no time. Cancelling it
    cancels every run."""

    def __init__(self, runs: list[Run]):
        self.active = list(runs)
        self.position = 0

    def __next__(self) -> tuple[Run, TokenEvent]:
        while self.active:
            run = self.active[self.position % len(self.active)]
            try:
                event = next(run.events)
            except StopIteration:
                self.active.remove(run)
                continue
            if event.finish_reason is not None:
                self.active.remove(run)
            else:
                self.position += 1
            return run, event
        raise StopIteration

    def cancel(self) -> None:
        for run in self.active:
            run.events.cancel()

    close = cancel


class Reply:
    """OpenAI's answer objects for one request, whole or as stream chunks."""

    def __init__(self, request: OpenAIRequest, tokenizer):
        self.request = request
        self.tokenizer = tokenizer
        self.chat = request.chat
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def whole(self, runs: list[Run]) -> dict:
        texts = {run.index: [run.echo] for run in runs}
        logprobs = {run.index: Logprobs(run, self) for run in runs}
        finish, completion_tokens = {}, 0
        for run, event in Merged(runs):
            texts[run.index].append(event.text)
            logprobs[run.index].add(event)
            if event.finish_reason is not None:
                finish[run.index] = _finish_reason(event.finish_reason)
                completion_tokens += event.generated_tokens
        choices = []
        for run in runs:
            text = "".join(texts[run.index])
            choice = {"index": run.index}
            if self.chat:
                choice["message"] = {"role": "assistant", "content": text}
            else:
                choice["text"] = text
            choice["logprobs"] = logprobs[run.index].whole()
            choice["finish_reason"] = finish.get(run.index, "stop")
            choices.append(choice)
        return {
            **self._head(self.object),
            "choices": choices,
            "usage": _usage(runs, completion_tokens),
        }

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.request.model}

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        chunk = {
            **self._head("chat.completion.chunk" if self.chat else "text_completion"),
            "choices": choices,
        }
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def first_chunks(self, runs: list[Run]) -> list[dict]:
        """Chat streams open each choice with the assistant role; completions echo."""
        if self.chat:
            return [
                self.chunk(
                    [
                        {
                            "index": run.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                    ]
                )
                for run in runs
            ]
        return [
            self.chunk(
                [{"index": run.index, "text": run.echo, "logprobs": None, "finish_reason": None}]
            )
            for run in runs
            if run.echo
        ]

    def event_chunk(self, run: Run, event: TokenEvent, logprobs: Logprobs) -> dict:
        finish = _finish_reason(event.finish_reason) if event.finish_reason is not None else None
        choice: dict[str, Any] = {"index": run.index}
        if self.chat:
            choice["delta"] = {"content": event.text} if event.text or finish is None else {}
        else:
            choice["text"] = event.text
        choice["logprobs"] = logprobs.step(event)
        choice["finish_reason"] = finish
        return self.chunk([choice])


class Logprobs:
    """One choice's log-probabilities, in the endpoint's format (None when not asked)."""

    def __init__(self, run: Run, reply: Reply):
        self.asked = reply.request.logprobs is not None
        self.chat = reply.chat
        self.tokenizer = reply.tokenizer
        self.offset = len(run.echo)
        self.entries: list = []

    def add(self, event: TokenEvent) -> None:
        if self.asked and event.logprob is not None:
            self.entries.append(self._entry(event))

    def step(self, event: TokenEvent) -> dict | None:
        if not self.asked or event.logprob is None:
            return None
        entry = self._entry(event)
        return {"content": [entry]} if self.chat else _completion_logprobs([entry])

    def whole(self) -> dict | None:
        if not self.asked:
            return None
        return {"content": self.entries} if self.chat else _completion_logprobs(self.entries)

    def _entry(self, event: TokenEvent) -> dict:
        token = event.token_text or ""
        top = [(self.tokenizer.decode([i]), value) for i, value in (event.top_logprobs or ())]
        entry = {"token": token, "logprob": event.logprob, "offset": self.offset}
        self.offset += len(event.text)
        if self.chat:
            entry.pop("offset")
            entry["bytes"] = list(token.encode("utf-8"))
            entry["top_logprobs"] = [
                {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}
                for text, value in top
            ]
        else:
            entry["top"] = dict(top)
        return entry


def _completion_logprobs(entries: list[dict]) -> dict:
    return {
        "tokens": [entry["token"] for entry in entries],
        "token_logprobs": [entry["logprob"] for entry in entries],
        "top_logprobs": [entry["top"] for entry in entries],
        "text_offset": [entry["offset"] for entry in entries],
    }


async def _events(reply: Reply, runs: list[Run], pool) -> AsyncIterator[bytes]:
    """The stream as server-sent events: `data: {chunk}` lines, then `data: [DONE]`."""
    for chunk in reply.first_chunks(runs):
        yield _sse(chunk)
    trackers = {run.index: Logprobs(run, reply) for run in runs}
    completion_tokens = 0
    try:
        async for run, event in async_iterate(Merged(runs), pool):
            yield _sse(reply.event_chunk(run, event, trackers[run.index]))
            if event.finish_reason is not None:
                completion_tokens += event.generated_tokens
        if reply.request.include_usage:
            yield _sse(reply.chunk([], _usage(runs, completion_tokens)))
    except Exception as err:  # noqa: BLE001  (a stream that has started can only tell)
        yield _sse(_as_openai_error(err).body())
    yield b"data: [DONE]\n\n"


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\n\n".encode()


def _usage(runs: list[Run], completion_tokens: int) -> dict:
    # Each prompt counts once, whatever `n` is (as OpenAI counts).
    prompt_tokens = sum({run.prompt: run.prompt_tokens for run in runs}.values())
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _finish_reason(reason: FinishReason) -> str:
    return _FINISH.get(reason, "stop")


async def _json_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as err:
        raise OpenAIError(400, f"the request body is not valid JSON: {err}") from None


def _as_openai_error(err: Exception) -> OpenAIError:
    if isinstance(err, OpenAIError):
        return err
    if isinstance(err, CaikitRuntimeException):
        return OpenAIError(
            STATUS_CODE_TO_HTTP.get(err.status_code, 500), public_text(str(err.message))
        )
    if isinstance(err, (ValueError, TypeError)):
        return from_settings_error(ValueError(public_text(str(err))))
    log.error("OpenAI route failed", exc_info=True)
    return OpenAIError(500, f"internal error: {public_text(str(err))[:200]}")


def _error(err: OpenAIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)
