"""A real caikit_tuning runtime in a subprocess, on free loopback ports."""

from pathlib import Path

import psutil
import pytest

from caikit_tuning.runtime.client import TuningClient
from caikit_tuning.runtime.process import RuntimeProcess, free_port  # noqa: F401  (used by tests)


class Runtime(RuntimeProcess):
    """The test server: a worker-pool trainer config and, optionally, a CA for TLS."""

    def __init__(
        self,
        root: Path,
        base_models_dir: Path,
        trainer: dict | None = None,
        extra: dict | None = None,
        ca_certificate: bytes | None = None,
    ):
        overrides = dict(extra or {})
        if trainer is not None:
            overrides["model_management"] = {"trainers": {"default": {"config": trainer}}}
        super().__init__(root, base_models_dir, overrides)
        self.ca_certificate = ca_certificate

    @property
    def client(self) -> TuningClient:
        return RuntimeProcess.client(self, self.ca_certificate)


def worker_processes(server: RuntimeProcess) -> list[psutil.Process]:
    """The server's own live workers (other test processes may run servers of their own)."""
    workers = []
    for child in psutil.Process(server.process.pid).children():
        try:
            if "caikit_tuning.runtime.worker" in " ".join(child.cmdline()):
                workers.append(child)
        except psutil.Error:  # exited meanwhile
            pass
    return workers


@pytest.fixture(scope="session")
def runtime(tmp_path_factory, base_models_dir):
    server = Runtime(tmp_path_factory.mktemp("runtime"), base_models_dir).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def client(runtime) -> TuningClient:
    return runtime.client
