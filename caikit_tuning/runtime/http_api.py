"""The HTTP API as the caikit ecosystem's clients read it.

- caikit-nlp-client reads a task's `parameters` from `/openapi.json` as
  `allOf[0].properties` (each nested message again under `allOf`, each field with a
  `type`); caikit 0.29's spec gives a bare `$ref` there (`KeyError: 'allOf'`). The
  parameters of every task route are written out inline under `allOf`.
- caikit-nlp-client 0.0.8 (the release on PyPI) reads server-sent events as `data:`
  lines only and cannot parse caikit 0.29's `event: message` lines. An event without
  a name is a message event by the SSE standard, so messages and errors are sent as
  plain `data:` events; an error is told by its `code` and `details`, as those
  clients (and caikit_tuning's own) already do.
"""

from __future__ import annotations

import copy
from typing import Any

from sse_starlette import ServerSentEvent

_SCHEMAS = "#/components/schemas/"


def shape_for_clients(spec: dict) -> dict:
    """`spec` with every task route's `parameters` inlined under `allOf` (in place)."""
    schemas = spec.get("components", {}).get("schemas", {})
    for route in spec.get("paths", {}).values():
        body = route.get("post", {}).get("requestBody", {})
        request = body.get("content", {}).get("application/json", {}).get("schema")
        request = _resolve(request, schemas) if request else None
        parameters = (request or {}).get("properties", {}).get("parameters")
        if parameters is not None and "$ref" in parameters:
            request["properties"]["parameters"] = _inline(parameters, schemas, depth=0)
    return spec


def _resolve(schema: dict, schemas: dict) -> dict:
    ref = schema.get("$ref", "")
    return schemas.get(ref[len(_SCHEMAS) :], schema) if ref.startswith(_SCHEMAS) else schema


def _inline(field: dict, schemas: dict, depth: int) -> dict:
    """A `$ref` field as {"allOf": [its message's schema, with that message's own `$ref`
    fields inlined the same way]}."""
    target = copy.deepcopy(_resolve(field, schemas))
    if depth < 8:
        for name, value in target.get("properties", {}).items():
            if "$ref" in value:
                target["properties"][name] = _inline(value, schemas, depth + 1)
            elif "type" not in value:
                value["type"] = _type_of(value)
    # Nothing beside allOf: caikit-nlp-client asserts the wrapper has one key.
    return {"allOf": [target]}


def _type_of(value: dict) -> str:
    """A field's type when the schema states it indirectly (anyOf / enum)."""
    for option in value.get("anyOf", []):
        if option.get("type") not in (None, "null"):
            return option["type"]
    return "string" if "enum" in value else "object"


def plain_event(data: Any = None, event: str | None = None, **options: Any) -> ServerSentEvent:
    """A server-sent event with no event name (see the module docstring)."""
    return ServerSentEvent(data=data, **options)
