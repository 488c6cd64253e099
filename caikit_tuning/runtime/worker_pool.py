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

Jobs wait in a queue in submission order. Each GPU runs one job at a time (the worker
sees only its GPU through CUDA_VISIBLE_DEVICES); without GPUs, `cpu_slots` jobs run at
once, sharing the cores. A job's arguments are validated at submission, so a bad
request fails with INVALID_ARGUMENT before any job starts. Cancelling a running job
terminates its process.
"""

from __future__ import annotations

import os
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
from caikit.core.exceptions.caikit_core_exception import (
    CaikitCoreException,
    CaikitCoreStatusCode,
)
from caikit.core.model_management.model_trainer_base import ModelTrainerBase

from .jobs import JOBS_FOLDER, Job, build_request
from .settings import runtime_folders

log = alog.use_channel("WORKERS")


@dataclass(frozen=True)
class Slot:
    """Where a job runs: one GPU, or one share of the CPU."""

    kind: str  # "cuda" or "cpu"
    index: int
    threads: int | None = None

    def environment(self) -> dict[str, str]:
        if self.kind == "cuda":
            return {"CUDA_VISIBLE_DEVICES": str(self.index)}
        env = {"CUDA_VISIBLE_DEVICES": ""}
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        return env


def plan_slots(gpus: Any, cpu_slots: int, gpu_count: int, cpu_count: int) -> list[Slot]:
    """One slot per GPU; without GPUs, `cpu_slots` slots sharing the cores."""
    if gpus == "auto":
        gpus = list(range(gpu_count))
    gpus = [int(g) for g in (gpus or [])]
    if gpus:
        return [Slot("cuda", g) for g in gpus]
    if cpu_slots < 1:
        raise ValueError(f"`cpu_slots` must be >= 1, got {cpu_slots}.")
    threads = max(1, cpu_count // cpu_slots)
    return [Slot("cpu", i, threads) for i in range(cpu_slots)]


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
        self._slots = plan_slots(
            config.get("gpus", "auto"),
            int(config.get("cpu_slots", 1)),
            _gpu_count(),
            os.cpu_count() or 1,
        )
        self._cancel_grace = float(config.get("cancel_grace_seconds", 3))
        self._max_retries = int(config.get("max_retries", 0))
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
            pending = [
                j.model_name for j in self._jobs.values() if not j.get_info().status.is_terminal
            ]
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
