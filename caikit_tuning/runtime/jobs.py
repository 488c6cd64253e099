"""One training job: its validated request on disk, its worker process and its status."""

from __future__ import annotations

import datetime
import json
import os
import pickle
import signal
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
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
from caikit.core.model_management.model_trainer_base import ModelTrainerFutureBase

from ..storage.paths import resolve_under
from .names import check_model_name, check_no_overlap
from .settings import runtime_folders

log = alog.use_channel("JOBS")

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


class Job(ModelTrainerFutureBase):
    """A queued or running training job, watched from the server."""

    def __init__(
        self,
        trainer_name: str,
        training_id: str,
        folder: Path,
        save_path: str,
        model_name: str,
        on_finish,
        cancel_grace: float,
        python: str,
        max_retries: int = 0,
        submitted: datetime.datetime | None = None,
    ):
        super().__init__(future_name=trainer_name, future_id=training_id)
        self.training_id = training_id
        self.model_name = model_name
        self._max_retries = max_retries
        self._attempt = 0
        self._save_path = save_path
        self._folder = folder
        self._on_finish = on_finish
        self._cancel_grace = cancel_grace
        self._python = python
        self._status = TrainingStatus.QUEUED
        self._reason: str | None = None
        self._progress: str | None = None
        self._submitted = submitted or datetime.datetime.now()
        self._completed: datetime.datetime | None = None
        self._process: subprocess.Popen | None = None
        self._slot = None
        self._done = threading.Event()
        self._lock = threading.Lock()

    @classmethod
    def submitted(cls, trainer_name: str, training_id: str, request: JobRequest, **options) -> Job:
        """A new job: its request written to its folder, its state recorded as QUEUED."""
        folder = request.write(training_id)
        job = cls(
            trainer_name,
            training_id,
            folder,
            str(request.save_path(training_id)),
            request.model_name,
            **options,
        )
        job._persist()
        return job

    @classmethod
    def restore(cls, trainer_name: str, folder: Path, **options) -> Job | None:
        """A job recorded by an earlier server process (None if its record is unreadable)."""
        try:
            state = json.loads((folder / STATE_FILE).read_text())
            job = cls(
                trainer_name,
                state["training_id"],
                folder,
                state["save_path"],
                state["model_name"],
                submitted=datetime.datetime.fromisoformat(state["submitted"]),
                **options,
            )
            job._status = TrainingStatus[state["status"]]
            job._reason = state.get("reason")
            if state.get("completed"):
                job._completed = datetime.datetime.fromisoformat(state["completed"])
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring the unreadable job record in %s: %s", folder, err)
            return None
        if job._status.is_terminal:
            job._done.set()
        return job

    def _persist(self) -> None:
        """Record the job's state on disk (atomically), so a restarted server knows it."""
        state = {
            "training_id": self.training_id,
            "model_name": self.model_name,
            "save_path": self._save_path,
            "status": self._status.name,
            "reason": self._reason,
            "submitted": self._submitted.isoformat(),
            "completed": self._completed.isoformat() if self._completed else None,
        }
        temporary = self._folder / f".{STATE_FILE}.tmp"
        temporary.write_text(json.dumps(state))
        os.replace(temporary, self._folder / STATE_FILE)

    @property
    def save_path(self) -> str:
        return self._save_path

    @property
    def submission_time(self) -> datetime.datetime:
        return self._submitted

    def requeue(self, note: str) -> None:
        """Back to QUEUED (a restored job whose worker died with the old server)."""
        with self._lock:
            self._status = TrainingStatus.QUEUED
            self._progress = note
            self._persist()

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    # ------------------------------------------------------------- lifecycle

    def start(self, slot) -> None:
        """Start the job's worker process on `slot`."""
        self._launch(slot)

    def _launch(self, slot) -> None:
        read_end, write_end = os.pipe()
        env = {**os.environ, **slot.environment(), "CAIKIT_TUNING_PROGRESS_FD": str(write_end)}
        config_files = runtime_folders().config_files
        if config_files:
            env["CONFIG_FILES"] = str(config_files)
        with self._lock:
            if self._status not in (TrainingStatus.QUEUED, TrainingStatus.RUNNING):  # cancelled
                os.close(read_end)
                os.close(write_end)
                self._finish_locked(self._status, self._reason)
                self._on_finish(slot)
                return
            with open(self._folder / LOG_FILE, "ab") as worker_log:
                self._process = subprocess.Popen(
                    [self._python, "-m", "caikit_tuning.runtime.worker", str(self._folder)],
                    env=env,
                    stdout=worker_log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_end,),
                    start_new_session=True,
                )
            self._slot = slot
            self._attempt += 1
            self._status = TrainingStatus.RUNNING
            self._persist()
        os.close(write_end)
        log.info("training %s running as pid %d on %s", self.id, self._process.pid, slot)
        threading.Thread(target=self._watch, args=(read_end,), daemon=True).start()

    def _watch(self, read_end: int) -> None:
        """Follow the worker's messages until it exits, then settle the status (or
        restart a worker that died, when retries are configured)."""
        result: dict | None = None
        with os.fdopen(read_end, "r", encoding="utf-8") as messages:
            for line in messages:
                try:
                    message = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if message.get("event") == "progress":
                    self._progress = describe_progress(message)
                elif message.get("event") in ("done", "error"):
                    result = message
        code = self._process.wait()
        retry = False
        with self._lock:
            if self._status == TrainingStatus.CANCELED:
                self._finish_locked(TrainingStatus.CANCELED, self._reason)
            elif result and result["event"] == "done" and code == 0:
                forget_served_model(self.model_name)
                self._finish_locked(TrainingStatus.COMPLETED, None)
            elif result and result["event"] == "error":
                self._finish_locked(TrainingStatus.ERRORED, result["message"])
            else:
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                retry = self._attempt <= self._max_retries
                if retry:
                    # The new worker resumes from the job's last checkpoint, if it saved one.
                    self._progress = f"restarting after the worker process died ({how})"
                    log.warning("training %s: worker died (%s), restarting", self.id, how)
                else:
                    self._finish_locked(
                        TrainingStatus.ERRORED,
                        f"the worker process died ({how}) before finishing; see "
                        f"{self._folder / LOG_FILE} on the server",
                    )
        if retry:
            self._launch(self._slot)
        else:
            self._on_finish(self._slot)

    def fail(self, reason: str) -> None:
        with self._lock:
            self._finish_locked(TrainingStatus.ERRORED, reason)

    def _finish_locked(self, status: TrainingStatus, reason: str | None) -> None:
        self._status = status
        self._reason = reason
        self._completed = self._completed or datetime.datetime.now()
        self._persist()
        self._done.set()

    # ------------------------------------------------------------- interface

    def get_info(self) -> JobInfo:
        return job_info(
            self._status, self._reason, self._progress, self._submitted, self._completed
        )

    def cancel(self) -> None:
        with self._lock:
            if self._status.is_terminal:
                return
            queued = self._status == TrainingStatus.QUEUED
            self._status = TrainingStatus.CANCELED
            self._reason = "cancelled by request"
            if queued:
                self._finish_locked(TrainingStatus.CANCELED, self._reason)
                return
            process = self._process
        _terminate(process, self._cancel_grace)
        self._done.wait(self._cancel_grace + 5)

    def wait(self) -> None:
        self._done.wait()

    def load(self):
        self.wait()
        if self._status != TrainingStatus.COMPLETED:
            raise TrainingFailed(self._reason or f"training {self.id} ended {self._status.name}")
        return caikit.load(self._save_path)


def forget_served_model(model_id: str) -> None:
    """A retrained model replaces its folder; drop the old copy from memory so the next
    request loads the new one."""
    from caikit.runtime.model_management.model_manager import ModelManager

    manager = ModelManager.get_instance()
    if model_id in manager.loaded_models:
        manager.unload_model(model_id)


def _terminate(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the worker's process group, then SIGKILL it after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def describe_progress(message: dict) -> str:
    loss = message.get("loss")
    loss_text = f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""
    return (
        f"step {message.get('step')}/{message.get('total_steps')}{loss_text}, "
        f"elapsed {message.get('elapsed_seconds')}s, eta {message.get('eta_seconds')}s"
    )
