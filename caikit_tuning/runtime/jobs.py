"""What every training backend (the worker pool, Ray) shares about a job: its request,
validated at submission and written to the job's folder, and its status, one state
machine: QUEUED -> RUNNING -> COMPLETED | ERRORED | CANCELED."""

from __future__ import annotations

import datetime
import os
import pickle
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import alog
import caikit
from caikit.core.data_model import DataStream, TrainingStatus
from caikit.core.exceptions.caikit_core_exception import (
    CaikitCoreException,
    CaikitCoreStatusCode,
)
from caikit.core.model_management.job_base import JobInfo

from ..storage.paths import resolve_under
from .names import check_model_name, check_no_overlap

log = alog.use_channel("JOBS")

# caikit merges its LOCAL trainer's defaults into every trainer's config block.
CAIKIT_LOCAL_DEFAULTS = {"retention_duration", "use_subprocess", "subprocess_start_method"}

REQUEST_FILE = "request.pkl"
STATE_FILE = "state.json"
CHECKPOINTS_FOLDER = "checkpoints"
LOG_FILE = "worker.log"
JOBS_FOLDER = ".jobs"


class TrainingFailed(RuntimeError):
    """Why a job ended in ERRORED (shown as the status reason)."""


class TrainingProgress(str):
    """A running job's latest progress line (shown as the status reason)."""


def _materialize(name: str, value: Any) -> Any:
    """Read a DataStream argument into a list of plain records, so it can be
    validated now and handed to the worker process."""
    if not isinstance(value, DataStream):
        return value
    try:
        return [item.to_dict() if hasattr(item, "to_dict") else item for item in value]
    except Exception as err:  # noqa: BLE001  (any reader error is a bad input)
        raise ValueError(f"`{name}` could not be read: {err}") from err


@dataclass(frozen=True)
class JobRequest:
    """A validated training request, ready for a worker."""

    module_class: type
    kwargs: dict[str, Any]
    output_root: Path
    model_name: str
    save_with_id: bool

    @classmethod
    def build(
        cls,
        module_class: type,
        kwargs: dict[str, Any],
        save_path: str | None,
        save_with_id: bool,
        model_name: str | None,
        pending: Iterable[str] = (),
    ) -> JobRequest:
        if save_path is not None and not isinstance(save_path, (str, os.PathLike)):
            raise ValueError(
                "`output_path` is not supported: a trained model is saved in "
                "runtime.training.output_dir, in the folder its `model_name` names."
            )
        if not save_path:
            raise ValueError("the runtime has no training output directory configured.")
        if not model_name:
            raise ValueError("`model_name` is required: it names the trained model.")
        # The model lands inside the output directory, under a name inference can ask for,
        # and never over or inside another model.
        check_model_name(model_name, "model_name")
        resolve_under(save_path, model_name, "model_name")
        if not save_with_id:
            check_no_overlap(Path(save_path).resolve(), model_name, pending)
        kwargs = {name: _materialize(name, value) for name, value in kwargs.items()}
        validate = getattr(module_class, "validate_training", None)
        if validate is not None:
            validate(kwargs)
        return cls(module_class, kwargs, Path(save_path).resolve(), model_name, save_with_id)

    def save_path(self, training_id: str) -> Path:
        parts = [training_id] if self.save_with_id else []
        return self.output_root.joinpath(*parts, self.model_name)

    def job_folder(self, training_id: str) -> Path:
        return self.output_root / JOBS_FOLDER / training_id

    def write(self, training_id: str) -> Path:
        """Put the request in the job's folder, where its worker (or a restarted
        server) reads it."""
        folder = self.job_folder(training_id)
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / REQUEST_FILE, "wb") as handle:
            # The server writes this file for its own workers; nothing else reads it.
            pickle.dump(
                {
                    "module": f"{self.module_class.__module__}:{self.module_class.__qualname__}",
                    "kwargs": self.kwargs,
                    "save_path": str(self.save_path(training_id)),
                    "model_name": self.model_name,
                },
                handle,
            )
        return folder


def build_request(
    module_class, args, kwargs, save_path, save_with_id, model_name, pending=()
) -> JobRequest:
    """Validate a train call now, so a bad request fails at submission, not in a job.
    `pending`: the model names of queued and running jobs."""
    if args:
        raise ValueError("training arguments must be passed by name.")
    try:
        return JobRequest.build(module_class, kwargs, save_path, save_with_id, model_name, pending)
    except (ValueError, TypeError) as err:
        # Both transports map this to INVALID_ARGUMENT / HTTP 400, with our message.
        raise CaikitCoreException(CaikitCoreStatusCode.INVALID_ARGUMENT, str(err)) from err


def job_info(status, reason, progress, submitted, completed) -> JobInfo:
    """A job's status with its reason (ERRORED, CANCELED) or its progress note, as
    callers see it (server folders named by their config keys)."""
    from .guards import public_text

    reason = public_text(reason) if reason else reason
    errors = None
    if status == TrainingStatus.ERRORED or (status == TrainingStatus.CANCELED and reason):
        errors = [TrainingFailed(reason)]
    elif status in (TrainingStatus.RUNNING, TrainingStatus.QUEUED) and progress:
        errors = [TrainingProgress(progress)]
    return JobInfo(
        status=status, errors=errors, submission_time=submitted, completion_time=completed
    )


class JobState:
    """A job's status, reason (why it ended) or progress note, and times, changed under
    one lock. `on_change` is told of every change (the worker pool persists it)."""

    def __init__(
        self,
        submitted: datetime.datetime | None = None,
        on_change: Callable[[JobState], None] | None = None,
    ):
        self.status = TrainingStatus.QUEUED
        self.reason: str | None = None
        self.progress: str | None = None
        self.submitted = submitted or datetime.datetime.now()
        self.completed: datetime.datetime | None = None
        # Held by a backend to start or stop work atomically with a change of state.
        self.lock = threading.Lock()
        self._done = threading.Event()
        self._on_change = on_change or (lambda state: None)

    def set_locked(self, status: TrainingStatus, progress: str | None = None) -> None:
        """A non-final status (QUEUED again, or RUNNING); the lock is held."""
        self.status = status
        if progress is not None:
            self.progress = progress
        self._on_change(self)

    def finish_locked(self, status: TrainingStatus, reason: str | None) -> None:
        self.status, self.reason = status, reason
        self.completed = self.completed or datetime.datetime.now()
        self._on_change(self)
        self._done.set()

    def finish(self, status: TrainingStatus, reason: str | None) -> None:
        with self.lock:
            self.finish_locked(status, reason)

    def settle_locked(self, status: TrainingStatus, reason: str | None) -> None:
        """The work ended with `status`, unless the job was cancelled meanwhile."""
        if self.status == TrainingStatus.CANCELED:
            status, reason = TrainingStatus.CANCELED, self.reason
        self.finish_locked(status, reason)

    def begin_cancel(self) -> TrainingStatus | None:
        """Mark the job CANCELED; returns the status it had (None if it had ended).
        A queued job ends at once; a running one ends when its backend stops it."""
        with self.lock:
            if self.status.is_terminal:
                return None
            previous = self.status
            self.status, self.reason = TrainingStatus.CANCELED, "cancelled by request"
            if previous == TrainingStatus.QUEUED:
                self.finish_locked(TrainingStatus.CANCELED, self.reason)
            return previous

    def restored(self, status: TrainingStatus, reason: str | None, completed) -> None:
        """The state an earlier server process recorded."""
        self.status, self.reason, self.completed = status, reason, completed
        if status.is_terminal:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def info(self) -> JobInfo:
        return job_info(self.status, self.reason, self.progress, self.submitted, self.completed)

    def load(self, training_id: str, save_path: str):
        """The trained model, once the job has COMPLETED."""
        self.wait()
        if self.status != TrainingStatus.COMPLETED:
            raise TrainingFailed(self.reason or f"training {training_id} ended {self.status.name}")
        return caikit.load(save_path)


def trainer_settings(cls: type, config: Mapping, trainer: str):
    """A trainer's `config` block as its settings dataclass `cls`: unknown keys are an
    error naming the valid ones (caikit's own LOCAL-trainer defaults are ignored)."""
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(config or {}) - set(valid) - CAIKIT_LOCAL_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown {trainer} trainer setting(s) {unknown}; valid: {valid}.")
    values = {k: dict(v) if isinstance(v, Mapping) else v for k, v in (config or {}).items()}
    return cls(**{k: v for k, v in values.items() if k in valid})


def active_model_names(jobs: Iterable) -> list[str]:
    """The model names queued and running jobs will write (a new job may not nest
    with them)."""
    return [job.model_name for job in jobs if not job.state.status.is_terminal]


def forget_served_model(model_id: str) -> None:
    """A retrained model replaces its folder; drop the old copy from memory so the next
    request loads the new one."""
    from caikit.runtime.model_management.model_manager import ModelManager

    manager = ModelManager.get_instance()
    if model_id in manager.loaded_models:
        manager.unload_model(model_id)


def describe_progress(message: dict) -> str:
    loss = message.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    return (
        f"step {message.get('step')}/{message.get('total_steps')}{loss_text}, "
        f"elapsed {message.get('elapsed_seconds')}s, eta {message.get('eta_seconds')}s"
    )
