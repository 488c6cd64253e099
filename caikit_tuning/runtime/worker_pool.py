"""A caikit trainer that runs each training job in its own worker process.

    model_management:
      trainers:
        default:
          type: WORKER_POOL
          import_class: caikit_tuning.runtime.worker_pool.WorkerPoolTrainer
          config:
            gpus: auto        # "auto" (every visible GPU), a list of indices, or []
            cpu_slots: 1      # concurrent jobs when there is no GPU
            cancel_grace_seconds: 3
            max_retries: 0    # restart a worker that died; it resumes from checkpoints
            allocator: tcmalloc  # preloaded into workers where installed; "system": libc's

Jobs wait in a queue in submission order. Each GPU runs one job at a time (the worker
sees only its GPU through CUDA_VISIBLE_DEVICES); without GPUs, `cpu_slots` jobs run at
once, sharing the cores. A job's arguments are validated at submission, so a bad
request fails with INVALID_ARGUMENT before any job starts. Cancelling a running job
terminates its process.
"""

from __future__ import annotations

import ctypes.util
import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aconfig
import alog
from caikit.core.data_model import TrainingStatus
from caikit.core.exceptions.caikit_core_exception import (
    CaikitCoreException,
    CaikitCoreStatusCode,
)
from caikit.core.model_management.job_base import JobInfo
from caikit.core.model_management.model_trainer_base import (
    ModelTrainerBase,
    ModelTrainerFutureBase,
)

from .. import CHOSE_SERVER_SPIN, SERVER_SPIN
from ..data_model.values import integer, number
from ..training.core_share import ENV as CORE_SHARE_ENV
from ..training.core_share import sees_the_whole_machine
from .jobs import (
    JOBS_FOLDER,
    LOG_FILE,
    STATE_FILE,
    JobRequest,
    JobState,
    active_model_names,
    build_request,
    describe_progress,
    forget_served_model,
    trainer_settings,
)
from .settings import runtime_folders

log = alog.use_channel("WORKERS")


@dataclass(frozen=True)
class Slot:
    """Where a job runs: one GPU, or one share of the CPU."""

    kind: str  # "cuda" or "cpu"
    index: int
    threads: int | None = None
    preload: str | None = None  # a malloc library for LD_PRELOAD (see `allocator_library`)

    def environment(self, server_env: dict[str, str]) -> dict[str, str]:
        """The worker's environment, from the server's. An LD_PRELOAD the server was
        given is kept as it is."""
        if self.preload and not server_env.get("LD_PRELOAD"):
            server_env = {**server_env, "LD_PRELOAD": self.preload}
        if self.kind == "cuda":
            return {**server_env, "CUDA_VISIBLE_DEVICES": str(self.index)}
        env = {**server_env, "CUDA_VISIBLE_DEVICES": ""}
        if sees_the_whole_machine():  # else the server's short spin, all threads
            env[CORE_SHARE_ENV] = "1"
            if CHOSE_SERVER_SPIN and env.get("GOMP_SPINCOUNT") == SERVER_SPIN:
                # libgomp's default spin, with a thread given up per core others use.
                del env["GOMP_SPINCOUNT"]
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


@dataclass(frozen=True)
class WorkerPoolSettings:
    """The trainer's `config` block."""

    gpus: Any = "auto"  # "auto", a list of GPU indices, or [] (CPU slots)
    cpu_slots: int = 1
    cancel_grace_seconds: float = 3.0
    max_retries: int = 0
    allocator: str = "tcmalloc"

    def __post_init__(self):
        if self.allocator not in ALLOCATORS:
            raise ValueError(
                f"`allocator` must be one of {sorted(ALLOCATORS)}, got {self.allocator!r}."
            )
        if self.gpus != "auto" and not (
            isinstance(self.gpus, (list, tuple)) and all(isinstance(g, int) for g in self.gpus)
        ):
            raise ValueError(f'`gpus` must be "auto" or a list of GPU indices, got {self.gpus!r}.')
        integer(self.cpu_slots, "cpu_slots", 1)
        number(self.cancel_grace_seconds, "cancel_grace_seconds", 0.0, low_open=True)
        integer(self.max_retries, "max_retries", 0)


# Workers' malloc: the name ctypes finds the library by (None: the C library's own).
# torch frees and allocates a step's large activations anew every step; with tcmalloc
# CPU prompt-tuning steps ran 10-13% faster for this project and for Trainer + peft
# alike (README, "Benchmarks"), where glibc tuned through mallopt gained 1%.
ALLOCATORS = {"tcmalloc": "tcmalloc_minimal", "system": None}


def allocator_library(allocator: str) -> str | None:
    """The shared library to preload for `allocator`, or None (the C library's malloc,
    or the allocator is not installed: the system's package, e.g. libtcmalloc-minimal4)."""
    name = ALLOCATORS[allocator]
    return ctypes.util.find_library(name) if name else None


def plan_slots(
    gpus: Any, cpu_slots: int, gpu_count: int, cpu_count: int, preload: str | None = None
) -> list[Slot]:
    """One slot per GPU; without GPUs, `cpu_slots` slots sharing the cores."""
    if gpus == "auto":
        gpus = list(range(gpu_count))
    gpus = [int(g) for g in (gpus or [])]
    if gpus:
        return [Slot("cuda", g, preload=preload) for g in gpus]
    if cpu_slots < 1:
        raise ValueError(f"`cpu_slots` must be >= 1, got {cpu_slots}.")
    threads = max(1, cpu_count // cpu_slots)
    return [Slot("cpu", i, threads, preload) for i in range(cpu_slots)]


def _gpu_count() -> int:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip()])
    try:
        out = subprocess.run(
            ["nvidia-smi", "--list-gpus"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return 0
    return len([line for line in out.stdout.splitlines() if line.startswith("GPU ")])


class WorkerPoolTrainer(ModelTrainerBase):
    __doc__ = __doc__
    name = "WORKER_POOL"

    def __init__(self, config: aconfig.Config, instance_name: str):
        self._instance_name = instance_name
        settings = trainer_settings(WorkerPoolSettings, config, self.name)
        preload = allocator_library(settings.allocator)
        if preload is None and ALLOCATORS[settings.allocator]:
            log.info("%s is not installed: workers use the C library's malloc", settings.allocator)
        self._slots = plan_slots(
            settings.gpus, settings.cpu_slots, _gpu_count(), os.cpu_count() or 1, preload
        )
        self._cancel_grace = settings.cancel_grace_seconds
        self._max_retries = settings.max_retries
        self._free = list(self._slots)
        self._queue: deque[Job] = deque()
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Condition()
        self._recover()
        self._dispatcher = threading.Thread(
            target=self._dispatch, name="job-dispatcher", daemon=True
        )
        self._dispatcher.start()
        log.info("worker pool with slots %s", self._slots)

    def _job_options(self) -> dict:
        return {
            "on_finish": self._release,
            "cancel_grace": self._cancel_grace,
            "python": sys.executable,
            "max_retries": self._max_retries,
        }

    def _recover(self) -> None:
        """Pick up the jobs an earlier server process recorded: finished ones keep
        answering status calls; interrupted ones run again (resuming from their
        checkpoints, if they save any), in their submission order."""
        output_dir = runtime_folders().training_output_dir
        if not output_dir:
            return
        folders = sorted(Path(output_dir, JOBS_FOLDER).glob("*/state.json"))
        jobs = [Job.restore(self._instance_name, f.parent, **self._job_options()) for f in folders]
        for job in sorted((j for j in jobs if j is not None), key=lambda j: j.submission_time):
            self._jobs[job.id] = job
            if not job.get_info().status.is_terminal:
                job.requeue("restarted after a server restart")
                self._queue.append(job)
                log.info("re-queued interrupted training %s", job.id)

    # ------------------------------------------------------------ interface

    def train(
        self,
        module_class,
        *args,
        save_path: str | None = None,
        save_with_id: bool = False,
        external_training_id: str | None = None,
        model_name: str | None = None,
        **kwargs,
    ) -> Job:
        with self._lock:
            pending = active_model_names(self._jobs.values())
        request = build_request(
            module_class, args, kwargs, save_path, save_with_id, model_name, pending
        )
        job = Job.submitted(
            self._instance_name,
            external_training_id or str(uuid.uuid4()),
            request,
            **self._job_options(),
        )
        with self._lock:
            if job.id in self._jobs and not self._jobs[job.id].get_info().status.is_terminal:
                raise ValueError(f"training {job.id} is already running.")
            self._jobs[job.id] = job
            self._queue.append(job)
            self._lock.notify_all()
        log.info("queued training %s (%s) -> %s", job.id, module_class.__name__, job.save_path)
        return job

    def get_model_future(self, training_id: str) -> Job:
        job = self._jobs.get(training_id)
        if job is None:
            raise CaikitCoreException(
                status_code=CaikitCoreStatusCode.NOT_FOUND,
                message=f"Unknown training_id: {training_id}",
            )
        return job

    # -------------------------------------------------------------- internal

    def _dispatch(self) -> None:
        """Start queued jobs, in order, whenever a slot is free."""
        while True:
            with self._lock:
                while not (self._queue and self._free):
                    self._lock.wait()
                job = self._queue.popleft()
                if job.get_info().status.is_terminal:  # cancelled while queued
                    continue
                slot = self._free.pop(0)
            try:
                job.start(slot)
            except Exception as err:  # noqa: BLE001  (any start failure ends the job)
                log.error("training %s could not start: %s", job.id, err)
                job.fail(f"the worker process could not start: {err}")

    def _release(self, slot: Slot) -> None:
        with self._lock:
            self._free.append(slot)
            self._free.sort(key=lambda s: (s.kind, s.index))
            self._lock.notify_all()


# ------------------------------------------------------------------ one job


class Job(ModelTrainerFutureBase):
    """A queued or running training job of the pool, run by its own worker process
    (caikit_tuning.runtime.worker) and watched from the server. Its state is kept in
    its folder, so a restarted server knows it."""

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
        self.state = JobState(submitted, on_change=self._persist)
        self._max_retries = max_retries
        self._attempt = 0
        self._save_path = save_path
        self._folder = folder
        self._on_finish = on_finish
        self._cancel_grace = cancel_grace
        self._python = python
        self._process: subprocess.Popen | None = None
        self._slot = None

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
        job._persist(job.state)
        return job

    @classmethod
    def restore(cls, trainer_name: str, folder: Path, **options) -> Job | None:
        """A job recorded by an earlier server process (None if its record is unreadable)."""
        try:
            record = json.loads((folder / STATE_FILE).read_text())
            job = cls(
                trainer_name,
                record["training_id"],
                folder,
                record["save_path"],
                record["model_name"],
                submitted=datetime.datetime.fromisoformat(record["submitted"]),
                **options,
            )
            completed = record.get("completed")
            job.state.restored(
                TrainingStatus[record["status"]],
                record.get("reason"),
                datetime.datetime.fromisoformat(completed) if completed else None,
            )
        except (OSError, ValueError, KeyError) as err:
            log.warning("ignoring the unreadable job record in %s: %s", folder, err)
            return None
        return job

    def _persist(self, state: JobState) -> None:
        """Record the job's state on disk (atomically)."""
        record = {
            "training_id": self.training_id,
            "model_name": self.model_name,
            "save_path": self._save_path,
            "status": state.status.name,
            "reason": state.reason,
            "submitted": state.submitted.isoformat(),
            "completed": state.completed.isoformat() if state.completed else None,
        }
        temporary = self._folder / f".{STATE_FILE}.tmp"
        temporary.write_text(json.dumps(record))
        os.replace(temporary, self._folder / STATE_FILE)

    @property
    def save_path(self) -> str:
        return self._save_path

    @property
    def submission_time(self) -> datetime.datetime:
        return self.state.submitted

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def requeue(self, note: str) -> None:
        """Back to QUEUED (a restored job whose worker died with the old server)."""
        with self.state.lock:
            self.state.set_locked(TrainingStatus.QUEUED, progress=note)

    # ------------------------------------------------------------- lifecycle

    def start(self, slot: Slot) -> None:
        """Start the job's worker process on `slot`."""
        read_end, write_end = os.pipe()
        env = {**slot.environment(dict(os.environ)), "CAIKIT_TUNING_PROGRESS_FD": str(write_end)}
        config_files = runtime_folders().config_files
        if config_files:
            env["CONFIG_FILES"] = str(config_files)
        with self.state.lock:
            if self.state.status not in (TrainingStatus.QUEUED, TrainingStatus.RUNNING):
                os.close(read_end)  # cancelled meanwhile
                os.close(write_end)
                self.state.settle_locked(self.state.status, self.state.reason)
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
            self.state.set_locked(TrainingStatus.RUNNING)
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
                    self.state.progress = describe_progress(message)
                elif message.get("event") in ("done", "error"):
                    result = message
        code = self._process.wait()
        retry = False
        with self.state.lock:
            if self.state.status == TrainingStatus.CANCELED:
                self.state.settle_locked(TrainingStatus.CANCELED, None)
            elif result and result["event"] == "done" and code == 0:
                forget_served_model(self.model_name)
                self.state.finish_locked(TrainingStatus.COMPLETED, None)
            elif result and result["event"] == "error":
                self.state.finish_locked(TrainingStatus.ERRORED, result["message"])
            else:
                how = f"signal {-code}" if code < 0 else f"exit code {code}"
                retry = self._attempt <= self._max_retries
                if retry:
                    # The new worker resumes from the job's last checkpoint, if it saved one.
                    self.state.progress = f"restarting after the worker process died ({how})"
                    log.warning("training %s: worker died (%s), restarting", self.id, how)
                else:
                    self.state.finish_locked(
                        TrainingStatus.ERRORED,
                        f"the worker process died ({how}) before finishing; see "
                        f"{self._folder / LOG_FILE} on the server",
                    )
        if retry:
            self.start(self._slot)
        else:
            self._on_finish(self._slot)

    def fail(self, reason: str) -> None:
        self.state.finish(TrainingStatus.ERRORED, reason)

    # ------------------------------------------------------------- interface

    def get_info(self) -> JobInfo:
        return self.state.info()

    def cancel(self) -> None:
        if self.state.begin_cancel() == TrainingStatus.RUNNING:
            _terminate(self._process, self._cancel_grace)
            self.state.wait(self._cancel_grace + 5)

    def wait(self) -> None:
        self.state.wait()

    def load(self):
        return self.state.load(self.id, self._save_path)


def _terminate(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM the worker's process group, then SIGKILL it after `grace` seconds."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
