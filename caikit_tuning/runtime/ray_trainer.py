"""A caikit trainer that runs each training job on a Ray cluster, data-parallel.

    model_management:
      trainers:
        default:
          type: RAY
          import_class: caikit_tuning.runtime.ray_trainer.RayTrainer
          config:
            address: "127.0.0.1:6379"   # the cluster's GCS (KubeRay: the head service)
            num_workers: 2               # data-parallel Ray Train workers per job
            resources_per_worker: {CPU: 1, GPU: 0}
            use_gpu: false               # true: one GPU per worker and NCCL; false: gloo
            max_retries: 0               # restarts of a failed worker group
            env_vars: {}                 # extra environment for the workers

A request is validated at submission, written to `<output_dir>/.jobs/<training id>/`
and run as a Ray task driving a Ray Train TorchTrainer; rank 0 writes `progress.json`
there and saves the model. Output, base models and runtime config must be at the same
paths on every node (shared storage). Ray is optional: it is imported on first use.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import alog
from caikit.core.data_model import TrainingStatus
from caikit.core.exceptions.caikit_core_exception import (
    CaikitCoreException,
    CaikitCoreStatusCode,
)
from caikit.core.model_management import ModelTrainerBase, ModelTrainerFutureBase
from caikit.core.model_management.job_base import JobInfo

from ..training.distributed import world
from . import job_runner, jobs
from .settings import runtime_folders

log = alog.use_channel("RAY")

INSTALL_HINT = "the RAY trainer needs Ray: pip install 'caikit-tuning[ray]'."
PROGRESS_FILE = "progress.json"
ERROR_FILE = "error.txt"
POLL_SECONDS = 0.5
CANCEL_WAIT_SECONDS = 10

# -------------------------------------------------------------- connecting


@dataclass(frozen=True)
class RaySettings:
    """The trainer's `config` block."""

    address: str = ""
    num_workers: int = 1
    resources_per_worker: dict = field(default_factory=lambda: {"CPU": 1})
    use_gpu: bool = False
    max_retries: int = 0
    env_vars: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.address:
            raise ValueError("`address` is required: the Ray cluster's host:port.")
        if int(self.num_workers) < 1:
            raise ValueError(f"`num_workers` must be >= 1, got {self.num_workers}.")
        if int(self.max_retries) < 0:
            raise ValueError(f"`max_retries` must be >= 0, got {self.max_retries}.")
        if self.resources_per_worker.get("GPU") and not self.use_gpu:
            raise ValueError("`resources_per_worker` asks for GPUs: set `use_gpu: true`.")

    @classmethod
    def from_config(cls, config: Mapping) -> RaySettings:
        return jobs.trainer_settings(cls, config, "RAY")

    @property
    def host_port(self) -> tuple[str, int] | None:
        """None for ray:// client addresses and "auto", which are left to Ray."""
        if "://" in self.address or ":" not in self.address:
            return None
        host, port = self.address.rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def on_loopback(self) -> bool:
        host = self.host_port[0] if self.host_port else ""
        with contextlib.suppress(ValueError):
            return host == "localhost" or ipaddress.ip_address(host).is_loopback
        return False


def worker_environment(settings: RaySettings) -> dict[str, str]:
    """What every Ray process of a job needs in its environment."""
    env = {"TOKENIZERS_PARALLELISM": "false"}
    # Ray Train imports torch before our package can set these (see caikit_tuning/__init__).
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        if name in os.environ:
            env[name] = os.environ[name]
    config_files = runtime_folders().config_files
    if config_files:
        env["CONFIG_FILES"] = str(config_files)  # the workers read the server's runtime config
    if settings.host_port:
        # Ray Train frees a cancelled job's placement group through Ray's state API,
        # which finds the cluster by RAY_ADDRESS unless the cluster keeps to /tmp/ray.
        env["RAY_ADDRESS"] = settings.address
    if settings.on_loopback:
        env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # see connect()
    return {**env, **{str(k): str(v) for k, v in settings.env_vars.items()}}


def connect(settings: RaySettings):
    """Join the cluster as a driver, or fail at once with the reason."""
    if settings.on_loopback:
        # Ray swaps a loopback address for the machine's external IP unless told the
        # cluster is one machine; a cluster started on 127.0.0.1 listens only there.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # A job watcher's Ray call during shutdown would otherwise start a new local cluster
    # (and write ~/.ray/auth_token).
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    try:
        if settings.host_port:
            # ray.init retries an unreachable cluster for minutes; a TCP probe answers now.
            socket.create_connection(settings.host_port, timeout=5).close()
        import ray

        ray.init(
            address=settings.address,
            ignore_reinit_error=True,
            log_to_driver=False,  # the workers' logs stay in the cluster's log folder
            logging_level="WARNING",
            runtime_env={"env_vars": worker_environment(settings)},
        )
    except Exception as err:  # noqa: BLE001  (unreachable, refused, wrong token...)
        raise CaikitCoreException(
            CaikitCoreStatusCode.CONNECTION_ERROR,
            f"cannot join the Ray cluster at {settings.address} ({type(err).__name__}: {err}); "
            "start it or fix model_management.trainers.default.config.address.",
        ) from err
    return ray


# ------------------------------------------------------------- server side


class RayTrainer(ModelTrainerBase):
    __doc__ = __doc__
    name = "RAY"

    def __init__(self, config, instance_name: str):
        self._instance_name = instance_name
        self._settings = RaySettings.from_config(config or {})
        if importlib.util.find_spec("ray") is None:
            raise ImportError(INSTALL_HINT)
        self._ray = None
        self._jobs: dict[str, RayJob] = {}
        self._lock = threading.Lock()

    def train(
        self,
        module_class,
        *args,
        save_path: str | None = None,
        save_with_id: bool = False,
        external_training_id: str | None = None,
        model_name: str | None = None,
        **kwargs,
    ) -> RayJob:
        with self._lock:
            pending = jobs.active_model_names(self._jobs.values())
        request = jobs.build_request(
            module_class, args, kwargs, save_path, save_with_id, model_name, pending
        )
        with self._lock:
            self._ray = self._ray or connect(self._settings)
            job = RayJob(self._instance_name, external_training_id or str(uuid.uuid4()), request)
            if job.id in self._jobs and not self._jobs[job.id].get_info().status.is_terminal:
                raise ValueError(f"training {job.id} is already running.")
            self._jobs[job.id] = job
        try:
            job.start(self._ray, self._settings)
        except Exception as err:  # noqa: BLE001  (any start failure ends the job)
            log.error("training %s could not start: %s", job.id, err)
            job.finish(TrainingStatus.ERRORED, f"the Ray job could not start: {err}")
        return job

    def get_model_future(self, training_id: str) -> RayJob:
        if training_id not in self._jobs:
            message = f"Unknown training_id: {training_id}"
            raise CaikitCoreException(CaikitCoreStatusCode.NOT_FOUND, message)
        return self._jobs[training_id]


class RayJob(ModelTrainerFutureBase):
    """One job on the cluster: QUEUED until rank 0 starts, then RUNNING."""

    def __init__(self, trainer_name: str, training_id: str, request: jobs.JobRequest):
        super().__init__(future_name=trainer_name, future_id=training_id)
        self.request = request
        self.training_id = training_id
        self.model_name = request.model_name
        self.state = jobs.JobState()
        self._save_path = str(request.save_path(training_id))
        self._folder = request.job_folder(training_id)
        self._ray = self._ref = None

    @property
    def save_path(self) -> str:
        return self._save_path

    def start(self, ray, settings: RaySettings) -> None:
        self.request.write(self.training_id)
        for stale in (PROGRESS_FILE, ERROR_FILE):  # from an earlier job with this id
            (self._folder / stale).unlink(missing_ok=True)
        # The task only waits on Ray Train, so it holds no CPU; Ray Train does the retries.
        drive = ray.remote(num_cpus=0, max_retries=0)(_drive)
        self._ray, self._ref = ray, drive.remote(str(self._folder), settings, os.getcwd())
        threading.Thread(target=self._watch, name=f"ray-job-{self.id}", daemon=True).start()
        log.info("training %s submitted to Ray -> %s", self.id, self._save_path)

    def _watch(self) -> None:
        """Follow rank 0's progress file until the task ends, then settle the status."""
        try:
            while not self._ray.wait([self._ref], timeout=POLL_SECONDS)[0]:
                self._read_progress()
            self._read_progress()
            result = self._ray.get(self._ref)
        except Exception as err:  # noqa: BLE001  (cancelled, or the task itself died)
            cause = getattr(err, "cause", None) or err
            result = {"message": f"the Ray job failed: {type(cause).__name__}: {cause}"}
        with self.state.lock:
            if result.get("event") == "done" and self.state.status != TrainingStatus.CANCELED:
                jobs.forget_served_model(self.request.model_name)
                self.state.finish_locked(TrainingStatus.COMPLETED, None)
            else:
                self.state.settle_locked(TrainingStatus.ERRORED, result.get("message"))

    def _read_progress(self) -> None:
        try:
            entry = json.loads((self._folder / PROGRESS_FILE).read_text())
        except (OSError, ValueError):
            return
        with self.state.lock:
            if self.state.status == TrainingStatus.QUEUED:
                self.state.set_locked(TrainingStatus.RUNNING)
        if entry.get("event") == "progress":
            self.state.progress = jobs.describe_progress(entry)
        elif entry.get("event") == "restarted":
            self.state.progress = (
                "restarted after a Ray Train worker failed; resuming from checkpoints"
            )

    def finish(self, status: TrainingStatus, reason: str | None) -> None:
        self.state.finish(status, reason)

    def get_info(self) -> JobInfo:
        return self.state.info()

    def cancel(self) -> None:
        if self.state.begin_cancel() is None:
            return
        # Killing the task kills the Train controller it owns, and the controller's workers.
        self._ray.cancel(self._ref, force=True, recursive=True)
        self.state.wait(CANCEL_WAIT_SECONDS)

    def wait(self) -> None:
        self.state.wait()

    def load(self):
        return self.state.load(self.id, self._save_path)


# ------------------------------------------------------- inside the cluster


def _drive(folder: str, settings: RaySettings, cwd: str) -> dict:
    """The job's Ray task: run the Train workers and say how that ended."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchTrainer

    # Ray rejects a GPU count, even 0, without use_gpu.
    resources = {k: v for k, v in settings.resources_per_worker.items() if v}
    trainer = TorchTrainer(  # gloo on CPU, NCCL with use_gpu
        _train_worker,
        train_loop_config={"folder": folder, "cwd": cwd},
        scaling_config=ScalingConfig(
            num_workers=settings.num_workers,
            use_gpu=settings.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name="train",
            storage_path=str(Path(folder) / "ray"),  # Ray Train's own records of the run
            failure_config=FailureConfig(max_failures=settings.max_retries),
        ),
    )
    try:
        trainer.fit()
    except TrainingFailedError as err:
        return {"event": "error", "message": _failure_reason(Path(folder), err)}
    except Exception as err:  # noqa: BLE001  (anything else ends the job with its reason)
        return {"event": "error", "message": f"{type(err).__name__}: {err}"}
    return {"event": "done"}


def _train_worker(config: dict) -> None:
    """One Ray Train worker; Ray Train has initialized torch.distributed."""
    if os.path.isdir(config["cwd"]):
        # Ray Train starts workers in its own folder; relative paths in the runtime
        # config mean the server's folder, where this node has it.
        os.chdir(config["cwd"])
    folder = Path(config["folder"])
    is_main = world().is_main
    progress = _progress_file(folder / PROGRESS_FILE) if is_main else lambda entry: None
    restarted = is_main and (folder / PROGRESS_FILE).exists()  # by Ray Train, after a failure
    if restarted:
        (folder / ERROR_FILE).unlink(missing_ok=True)
    progress({"event": "restarted" if restarted else "started"})
    try:
        job_runner.run_job(folder, progress, save=is_main)
    except BaseException as err:
        # The first rank to fail names the cause ("x": only if no rank wrote it yet);
        # the others then fail in a collective.
        with contextlib.suppress(OSError), open(folder / ERROR_FILE, "x") as handle:
            handle.write(f"{type(err).__name__}: {err}")
        raise


def _progress_file(path: Path) -> Callable[[dict], None]:
    """Rank 0's latest progress, replaced atomically, at most every POLL_SECONDS (the
    server polls it; a network filesystem need not carry every step)."""
    last = [0.0]

    def write(entry: dict) -> None:
        final = entry.get("step") == entry.get("total_steps") or "event" in entry
        if time.monotonic() - last[0] >= POLL_SECONDS or final:
            last[0] = time.monotonic()
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_text(json.dumps({"event": "progress", **entry}, default=str))
            os.replace(temporary, path)

    return write


def _failure_reason(folder: Path, err: Exception) -> str:
    """A dead worker first (the others then fail in their collectives), else the first
    exception a worker raised."""
    failures = getattr(err, "worker_failures", None) or {}
    for rank, failure in sorted(failures.items()):
        # Ray Train reports a dead worker as a failed health check (internal classes).
        if type(failure).__name__.startswith("WorkerHealthCheck"):
            pid = re.search(r"pid=(\d+)", str(failure))
            where = f" (pid {pid.group(1)})" if pid else ""
            return (
                f"the Ray Train worker of rank {rank}{where} died before finishing; "
                "see its log in the Ray dashboard"
            )
    try:
        return (folder / ERROR_FILE).read_text()
    except OSError:
        return f"Ray Train failed: {str(err).strip().splitlines()[0]}"
