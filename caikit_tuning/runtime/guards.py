"""Checks the caikit runtime lacks: model ids and data file paths stay in their folders.

caikit 0.29 lazily loads whatever path a model id spells ("/abs/path", "../x") and
reads training files from anywhere. These guards wrap the runtime's own entry points,
so every transport (gRPC, HTTP) gets the same check and an INVALID_ARGUMENT error.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import caikit
from caikit.core.data_model import DataStream
from caikit.runtime.model_management.model_manager import ModelManager
from caikit.runtime.service_generation.data_stream_source import FilePluginBase
from caikit.runtime.types.caikit_runtime_exception import CaikitRuntimeException
from grpc import StatusCode

from ..base_models.paths import resolve_under
from ..data.files import read_records_file

_INSTALLED = False


def check_model_id(model_id: str) -> None:
    """A model id is a plain name (or sub-path) inside local_models_dir."""
    root = caikit.get_config().runtime.local_models_dir
    try:
        resolve_under(root, model_id, "model_id")
    except ValueError as err:
        raise CaikitRuntimeException(StatusCode.INVALID_ARGUMENT, str(err)) from err
    if model_id.startswith(".") or "/." in model_id:
        raise CaikitRuntimeException(
            StatusCode.INVALID_ARGUMENT,
            f"`model_id` must not name a hidden entry, got {model_id!r}.",
        )


def resolve_data_file(path: str) -> str:
    """A training file is a name inside data_streams.file_source_base."""
    root = caikit.get_config().data_streams.get("file_source_base")
    if not root:
        raise CaikitRuntimeException(
            StatusCode.INVALID_ARGUMENT,
            "training data files are disabled: set data_streams.file_source_base to the "
            "folder they may be read from, or send the records inline.",
        )
    try:
        return str(resolve_under(root, path, "train_stream.file.filename"))
    except ValueError as err:
        raise CaikitRuntimeException(StatusCode.INVALID_ARGUMENT, str(err)) from err


def read_data_file(cls, fname: str, element_type: type) -> DataStream:
    """Training records from a file in file_source_base, parsed by caikit_tuning's reader:
    any columns (for multi-field verbalizers) or chat records, and errors that name the
    file and line."""
    path = resolve_data_file(fname)
    try:
        return DataStream.from_iterable(read_records_file(path))
    except ValueError as err:
        raise CaikitRuntimeException(StatusCode.INVALID_ARGUMENT, str(err)) from err


def install() -> None:
    """Wrap the runtime's model lookup, local model loading and file reading (once)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True

    retrieve = ModelManager.retrieve_model

    @functools.wraps(retrieve)
    def guarded_retrieve(self, model_id: str):
        if isinstance(model_id, str) and model_id:
            check_model_id(model_id)
        return retrieve(self, model_id)

    load = ModelManager.load_model

    @functools.wraps(load)
    def skip_hidden(self, model_id: str, *args, **kwargs):
        # Staging folders of saves in progress and job folders are not models.
        if Path(str(model_id)).name.startswith("."):
            return None
        return load(self, model_id, *args, **kwargs)

    ModelManager.retrieve_model = guarded_retrieve
    ModelManager.load_model = skip_hidden
    FilePluginBase._get_resolved_source_path = staticmethod(resolve_data_file)
    FilePluginBase._create_data_stream_from_file = classmethod(read_data_file)


class Utf8BodyGuard:
    """ASGI middleware: a request body that is not UTF-8 gets HTTP 400 with the reason
    (caikit's HTTP server would answer 500), and never reaches the handlers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        chunks, more = [], True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as err:
            return await _reject(send, f"the request body is not valid UTF-8 (byte {err.start}).")
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


async def _reject(send, details: str) -> None:
    payload = json.dumps({"details": details, "code": 400}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})
