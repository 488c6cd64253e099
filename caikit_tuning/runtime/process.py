"""A caikit_tuning runtime in a child process, on free loopback ports: for examples,
benchmarks and tests that talk to a real server."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from .client import TuningClient


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _PortTaken(RuntimeError):
    """The server could not bind one of its ports."""


_BIND_FAILURES = ("Failed to bind to address", "address already in use")


def merge(base: dict, extra: dict) -> dict:
    """Deep-merge `extra` into `base` (in place) and return it."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value
    return base


class RuntimeProcess:
    """`python -m caikit_tuning.runtime` with a generated config, in `root`."""

    def __init__(self, root: Path, base_models_dir: Path, extra: dict[str, Any] | None = None):
        self.root = Path(root)
        self.models = self.root / "served"
        self.data = self.root / "data"
        self.models.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        self.config = merge(
            {
                "runtime": {
                    "library": "caikit_tuning",
                    "bind_host": "127.0.0.1",
                    "local_models_dir": str(self.models),
                    "lazy_load_local_models": True,
                    "lazy_load_poll_period_seconds": 1,
                    "training": {"output_dir": str(self.models), "save_with_id": False},
                    "grpc": {"enabled": True, "port": self.grpc_port},
                    "http": {"enabled": True, "port": self.http_port},
                    "metrics": {"enabled": True, "port": self.metrics_port},
                },
                "log": {"level": "warning"},
                "data_streams": {"file_source_base": str(self.data)},
                "base_models_dir": str(base_models_dir),
                "restrict_base_models_to_dir": True,
                "model_management": {
                    "trainers": {
                        "default": {
                            "type": "WORKER_POOL",
                            "import_class": "caikit_tuning.runtime.worker_pool.WorkerPoolTrainer",
                            "config": {"gpus": [], "cpu_slots": 1, "cancel_grace_seconds": 2},
                        }
                    }
                },
            },
            extra or {},
        )
        self.config_file = self.root / "runtime_config.yaml"
        self.config_file.write_text(yaml.safe_dump(self.config))
        self.log_file = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 120, env: dict[str, str] | None = None) -> RuntimeProcess:
        """Start the server and wait until it is ready. A free port can be taken by another
        process before the server binds it; then the server starts again on fresh ports."""
        for attempt in range(3):
            try:
                return self._start(timeout, env)
            except _PortTaken:
                runtime = self.config["runtime"]
                chosen_here = (self.grpc_port, self.http_port, self.metrics_port) == (
                    runtime["grpc"]["port"],
                    runtime["http"]["port"],
                    runtime["metrics"]["port"],
                )
                if attempt == 2 or not chosen_here:  # never move ports a caller set
                    raise
                self._choose_ports()
        raise AssertionError("unreachable")

    def _choose_ports(self) -> None:
        self.grpc_port, self.http_port, self.metrics_port = free_port(), free_port(), free_port()
        runtime = self.config["runtime"]
        runtime["grpc"]["port"] = self.grpc_port
        runtime["http"]["port"] = self.http_port
        runtime["metrics"]["port"] = self.metrics_port
        self.config_file.write_text(yaml.safe_dump(self.config))

    def _start(self, timeout: float, env: dict[str, str] | None) -> RuntimeProcess:
        environment = {**os.environ, "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        environment.pop("CONFIG_FILES", None)
        offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "caikit_tuning.runtime", "--config", str(self.config_file)],
                cwd=self.root,
                env=environment,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            output = self.log_file.read_text(errors="replace")[offset:]
            if self.process.poll() is not None:
                if any(failure in output for failure in _BIND_FAILURES):
                    raise _PortTaken(output[-3000:])
                raise RuntimeError(f"the server exited:\n{output[-3000:]}")
            if "runtime ready" in output:
                return self
            time.sleep(0.2)
        raise TimeoutError(f"the server did not start:\n{output[-3000:]}")

    def kill(self) -> None:
        """SIGKILL: the server dies without any chance to clean up."""
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> RuntimeProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def client(
        self, ca_certificate: bytes | None = None, api_key: str | None = None
    ) -> TuningClient:
        scheme = "https" if ca_certificate else "http"
        return TuningClient(
            f"localhost:{self.grpc_port}",
            f"{scheme}://localhost:{self.http_port}",
            ca_certificate=ca_certificate,
            api_key=api_key,
        )
