"""The worker process of one training job: `python -m caikit_tuning.runtime.worker FOLDER`.

It trains the module named in FOLDER/request.pkl, saves the model (atomically) where
the request says, and reports progress, then "done" or "error", as JSON lines on the
file descriptor the server passed in CAIKIT_TUNING_PROGRESS_FD.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path


def _exit_with_server(server_pid: int) -> None:
    """The worker dies with its server: a restarted server re-runs the job instead of
    finding a stray worker still writing its model. (Re-parenting shows the death.)"""
    while os.getppid() == server_pid:
        time.sleep(0.5)
    os._exit(1)


def main(folder: Path) -> int:
    channel = os.fdopen(int(os.environ.pop("CAIKIT_TUNING_PROGRESS_FD")), "w", buffering=1)
    threading.Thread(target=_exit_with_server, args=(os.getppid(),), daemon=True).start()

    def send(message: dict) -> None:
        channel.write(json.dumps(message, default=str) + "\n")

    try:
        import caikit_tuning  # noqa: F401  (configures caikit, registers modules)
        from caikit_tuning.runtime.job_runner import run_job
        from caikit_tuning.training.core_share import shared_cores

        shared_cores()  # threads for the cores the server leaves, before the model loads

        run_job(folder, lambda entry: send({"event": "progress", **entry}))
    except BaseException as err:  # noqa: BLE001  (report every failure to the server)
        traceback.print_exc()
        send({"event": "error", "message": f"{type(err).__name__}: {err}"})
        return 1
    send({"event": "done"})
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1])))
