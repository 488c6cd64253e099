"""Checks the caikit runtime lacks: model ids and data file paths stay in their folders,
and what goes back to callers never shows the server's own paths.

caikit 0.29 lazily loads whatever path a model id spells ("/abs/path", "../x") and
reads training files from anywhere. These guards wrap the runtime's own entry points,
so every transport (gRPC, HTTP) gets the same check and an INVALID_ARGUMENT error.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from caikit.core.data_model import DataStream
from caikit.runtime.model_management.model_manager import ModelManager
from caikit.runtime.service_generation.data_stream_source import FilePluginBase
from caikit.runtime.types.caikit_runtime_exception import CaikitRuntimeException
from grpc import StatusCode

from ..config import library_settings
from ..data.files import read_records_file
from ..storage.paths import resolve_under
from .names import check_model_name
from .settings import runtime_folders

_INSTALLED = False


def check_model_id(model_id: str) -> None:
    """A model id follows the model-name rule (runtime.names) and stays inside
    local_models_dir (no symlink out of it)."""
    root = runtime_folders().local_models_dir
    try:
        check_model_name(model_id, "model_id")
        resolve_under(root, model_id, "model_id")
    except ValueError as err:
        raise CaikitRuntimeException(StatusCode.INVALID_ARGUMENT, str(err)) from err


def resolve_data_file(path: str) -> str:
    """A training file is a name inside data_streams.file_source_base."""
    root = runtime_folders().file_source_base
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


def public_text(text: str) -> str:
    """`text` (an error message, a job's reason) with the server's absolute folders
    replaced by the config keys that name them: callers see `<local_models_dir>/x`,
    never where the server keeps its files."""
    for folder, label in _server_folders():
        text = text.replace(folder, label)
    return text


def _server_folders() -> list[tuple[str, str]]:
    folders, library = runtime_folders(), library_settings()
    named = {
        "local_models_dir": folders.local_models_dir,
        "training.output_dir": folders.training_output_dir,
        "base_models_dir": str(library.base_models_dir),
        "data_streams.file_source_base": folders.file_source_base,
        "source_prompt_base": str(library.source_prompt_base),
    }
    pairs = [(str(Path(os.getcwd())), ".")]
    for label, folder in named.items():
        if folder:
            pairs.append((str(Path(folder).resolve()), f"<{label}>"))
            if os.path.isabs(folder):
                pairs.append((str(folder).rstrip("/"), f"<{label}>"))
    # Longest first, so a folder inside another is named by its own key.
    return sorted(set(pairs), key=lambda pair: -len(pair[0]))


def install() -> None:
    """Wrap the runtime's model lookup, local model loading, file reading and error
    answers (once)."""
    global _INSTALLED
    if _INSTALLED:
        return
    _INSTALLED = True
    _install_public_errors()

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


def _install_public_errors() -> None:
    """Scrub server paths from caikit's runtime errors (both transports raise them)
    and from the model list's paths."""
    from caikit.runtime.servicers.info_servicer import InfoServicer

    initialize = CaikitRuntimeException.__init__

    @functools.wraps(initialize)
    def public_init(self, status_code, message, *args, **kwargs):
        initialize(self, status_code, public_text(str(message)), *args, **kwargs)

    CaikitRuntimeException.__init__ = public_init

    models_info = InfoServicer._get_models_info

    @functools.wraps(models_info)
    def public_models_info(self, *args, **kwargs):
        response = models_info(self, *args, **kwargs)
        for model in response.models:
            if model.model_path:
                model.model_path = public_text(str(model.model_path))
        return response

    InfoServicer._get_models_info = public_models_info
