"""OpenAI request bodies -> what to generate, validated where they enter.

`/v1/completions` and `/v1/chat/completions` take OpenAI's parameters, and the extra
ones vLLM accepts (`top_k`, `min_tokens`, `repetition_penalty`, ...). Each request
becomes one `OpenAIRequest`: the model, the prompts or the conversation, and the
generation values in `GenerationSettings`' own names. A parameter that cannot be
honoured, or is unknown, is an `OpenAIError` (400) naming it; nothing is dropped
silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..data_model.values import flag, integer, number
from ..generation.settings import MAX_COUNT, MAX_TOP_LOGPROBS
from .names import check_model_name

# Choices per prompt (`n`), and prompts per completion request, at most.
MAX_CHOICES = 16
MAX_PROMPTS = 64
# OpenAI's temperature range; 0 is greedy decoding.
MAX_TEMPERATURE = 2.0
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_ROLES = ("system", "developer", "user", "assistant")

_COMMON = (
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    # vLLM's extra parameters
    "top_k",
    "min_tokens",
    "repetition_penalty",
    "typical_p",
    "truncate_prompt_tokens",
)
COMPLETION_PARAMETERS = (*_COMMON, "prompt", "logprobs", "echo", "best_of", "suffix")
CHAT_PARAMETERS = (
    *_COMMON,
    "messages",
    "logprobs",
    "top_logprobs",
    "max_completion_tokens",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
)
# GenerationSettings' names as OpenAI's clients know them, for error messages.
PUBLIC_NAMES = {
    "max_new_tokens": "max_tokens",
    "min_new_tokens": "min_tokens",
    "stop_sequences": "stop",
    "truncate_input_tokens": "truncate_prompt_tokens",
    "decoding_method": "temperature",
}


class OpenAIError(Exception):
    """An error answered as OpenAI's error object, with its HTTP status."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {
            "error": {
                "message": self.message,
                "type": kind,
                "param": self.param,
                "code": self.code,
            }
        }


def invalid(message: str, param: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param, "invalid_value" if param else None)


def from_settings_error(err: ValueError) -> OpenAIError:
    """A GenerationSettings error, in the names the client sent."""
    message, param = str(err), None
    for name, public in PUBLIC_NAMES.items():
        if f"`{name}`" in message:
            message = message.replace(f"`{name}`", f"`{public}`")
            param = param or public
    if param is None and "`" in message:
        param = message.split("`")[1]
    return invalid(message, param)


@dataclass(frozen=True)
class OpenAIRequest:
    model: str
    chat: bool
    # Completions: the prompts (each answered `n` times). Chat: one conversation.
    prompts: tuple[str, ...] = ()
    messages: tuple[dict, ...] = ()
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    # Completions: alternatives per token (0: the chosen token's only). Chat: None or
    # the number of alternatives. None: no logprobs.
    logprobs: int | None = None
    # GenerationSettings values, but max_new_tokens when the client left it to the model.
    settings: dict[str, Any] = field(default_factory=dict)

    def choice_settings(self, choice: int) -> dict[str, Any]:
        """The values for the `choice`-th answer: seeded requests give each answer its
        own seed (seed, seed + 1, ...), so `n` sampled answers differ but repeat."""
        values = dict(self.settings)
        if values.get("seed") is not None:
            values["seed"] = values["seed"] + choice
        return values


def parse_completion(body: Any) -> OpenAIRequest:
    body = _object(body, COMPLETION_PARAMETERS)
    prompts = _prompts(body.get("prompt"))
    echo = _optional(body, "echo", flag) or False
    logprobs = _optional(body, "logprobs", integer, 0, MAX_TOP_LOGPROBS)
    if echo and logprobs is not None:
        raise invalid(
            "`echo` together with `logprobs` (log-probabilities of the prompt's tokens) is not "
            "supported; ask for one of them.",
            "echo",
        )
    n = _choices(body)
    best_of = _optional(body, "best_of", integer, 1, MAX_CHOICES)
    if best_of is not None and best_of != n:
        raise invalid("`best_of` other than `n` is not supported; leave it unset.", "best_of")
    if body.get("suffix") not in (None, ""):
        raise invalid("`suffix` (insertion) is not supported; leave it unset.", "suffix")
    settings = _settings(body, body.get("max_tokens"), COMPLETION_MAX_TOKENS)
    if logprobs is not None:
        settings.update(include_logprobs=True, top_logprobs=logprobs)
    return OpenAIRequest(
        model=_model(body),
        chat=False,
        prompts=prompts,
        n=n,
        echo=echo,
        logprobs=logprobs,
        **_streaming(body),
        settings=settings,
    )


def parse_chat(body: Any) -> OpenAIRequest:
    body = _object(body, CHAT_PARAMETERS)
    messages = _messages(body.get("messages"))
    wants_logprobs = _optional(body, "logprobs", flag) or False
    top = _optional(body, "top_logprobs", integer, 0, MAX_TOP_LOGPROBS)
    if top is not None and not wants_logprobs:
        raise invalid("`top_logprobs` needs `logprobs: true`.", "top_logprobs")
    if body.get("tools"):
        raise invalid("`tools` (function calling) is not supported; leave it unset.", "tools")
    if body.get("tool_choice") not in (None, "none"):
        raise invalid("`tool_choice` is not supported; leave it unset.", "tool_choice")
    response_format = body.get("response_format")
    if response_format not in (None, {"type": "text"}):
        raise invalid(
            '`response_format` other than {"type": "text"} is not supported.', "response_format"
        )
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    settings = _settings(body, limit, None)
    if wants_logprobs:
        settings.update(include_logprobs=True, top_logprobs=top or 0)
    return OpenAIRequest(
        model=_model(body),
        chat=True,
        messages=messages,
        n=_choices(body),
        logprobs=(top or 0) if wants_logprobs else None,
        **_streaming(body),
        settings=settings,
    )


def _object(body: Any, valid: tuple[str, ...]) -> dict:
    if not isinstance(body, dict):
        raise invalid("the request body must be a JSON object.")
    unknown = sorted(set(body) - set(valid))
    if unknown:
        raise invalid(
            f"Unrecognized request argument(s) supplied: {', '.join(unknown)}; this endpoint "
            f"takes {', '.join(valid)}.",
            unknown[0],
        )
    return body


def _optional(body: dict, name: str, parse, *bounds):
    value = body.get(name)
    if value is None:
        return None
    try:
        return parse(value, name, *bounds)
    except ValueError as err:  # WrongType is one too
        raise invalid(str(err), name) from None


def _model(body: dict) -> str:
    model = body.get("model")
    try:
        return check_model_name(model, "model")
    except ValueError as err:
        raise invalid(str(err), "model") from None


def _choices(body: dict) -> int:
    return _optional(body, "n", integer, 1, MAX_CHOICES) or 1


def _streaming(body: dict) -> dict:
    stream = _optional(body, "stream", flag) or False
    options = body.get("stream_options")
    if options is not None and not stream:
        raise invalid("`stream_options` only applies with `stream: true`.", "stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid(
            '`stream_options` takes only {"include_usage": true|false}.', "stream_options"
        )
    usage = _optional(options or {}, "include_usage", flag) or False
    return {"stream": stream, "include_usage": usage}


def _prompts(value: Any) -> tuple[str, ...]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, list) or not prompts:
        raise invalid("`prompt` must be a string or a non-empty list of strings.", "prompt")
    if not all(isinstance(prompt, str) for prompt in prompts):
        raise invalid(
            "`prompt` must be text: a string or a list of strings (token-id prompts are not "
            "supported).",
            "prompt",
        )
    if len(prompts) > MAX_PROMPTS:
        raise invalid(
            f"`prompt` may hold at most {MAX_PROMPTS} prompts, got {len(prompts)}.", "prompt"
        )
    return tuple(prompts)


def _messages(value: Any) -> tuple[dict, ...]:
    if not isinstance(value, list) or not value:
        raise invalid("`messages` must be a non-empty list of {role, content} objects.", "messages")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"`{where}` must be an object with `role` and `content`.", "messages")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise invalid(
                f"`{where}.role` must be one of {list(CHAT_ROLES)}, got {role!r}.", "messages"
            )
        extra = sorted(set(message) - {"role", "content", "name"})
        if extra:
            raise invalid(
                f"`{where}` has unsupported field(s) {extra} (tool calls are not supported).",
                "messages",
            )
        messages.append(
            {
                "role": "system" if role == "developer" else role,
                "content": _content(message.get("content"), where),
            }
        )
    return tuple(messages)


def _content(content: Any, where: str) -> str:
    """A message's content: a string, or a list of text parts (joined)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
        for part in content
    ):
        return "".join(part["text"] for part in content)
    raise invalid(
        f'`{where}.content` must be a string or a list of {{"type": "text", "text": ...}} '
        "parts (images and audio are not supported).",
        "messages",
    )


def _settings(body: dict, max_tokens: Any, default_max_tokens: int | None) -> dict[str, Any]:
    """The generation values in GenerationSettings' names. `max_new_tokens` is None when
    neither the client nor the endpoint sets one (chat: up to the model's context)."""
    temperature = _optional(body, "temperature", number, 0.0, MAX_TEMPERATURE)
    greedy = temperature == 0.0
    if body.get("logit_bias"):
        raise invalid("`logit_bias` is not supported; leave it unset.", "logit_bias")
    limit = _optional({"max_tokens": max_tokens}, "max_tokens", integer, 1, MAX_COUNT)
    top_k = _optional(body, "top_k", integer, -1, MAX_COUNT)
    values = {
        "max_new_tokens": limit if limit is not None else default_max_tokens,
        "min_new_tokens": _optional(body, "min_tokens", integer, 0, MAX_COUNT),
        "decoding_method": "GREEDY" if greedy else "SAMPLING",
        "temperature": None if greedy or temperature == 1.0 else temperature,
        "top_p": None if greedy else _optional(body, "top_p", number, 0.0, 1.0),
        "top_k": None if greedy or top_k in (None, -1, 0) else top_k,
        "typical_p": None if greedy else _optional(body, "typical_p", number, 0.0, 1.0),
        "seed": None if greedy else _optional(body, "seed", integer, 0, 2**63 - 1),
        "repetition_penalty": _optional(body, "repetition_penalty", number),
        "truncate_input_tokens": _optional(body, "truncate_prompt_tokens", integer, 0, MAX_COUNT),
        "presence_penalty": _optional(body, "presence_penalty", number),
        "frequency_penalty": _optional(body, "frequency_penalty", number),
        "stop_sequences": _stops(body.get("stop")),
    }
    return {
        name: value
        for name, value in values.items()
        if value is not None or name == "max_new_tokens"
    }


def _stops(value: Any) -> list[str] | None:
    if value is None:
        return None
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(stop, str) for stop in stops):
        raise invalid("`stop` must be a string or a list of strings.", "stop")
    return stops or None


__all__ = [
    "OpenAIError",
    "OpenAIRequest",
    "from_settings_error",
    "parse_chat",
    "parse_completion",
]
