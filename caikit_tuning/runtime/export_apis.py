"""Write the runtime's APIs as files: `python -m caikit_tuning.runtime.export_apis protos/`.

The .proto files come from caikit's own service dump; openapi.json is the spec the
running HTTP server serves (caikit's dump leaves dangling references in its copy).
The output is deterministic, so a test can compare it with the committed files.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

OPENAPI_FILE = "openapi.json"


def export(out_dir: str | Path, config_file: str | None = None) -> Path:
    os.environ["RUNTIME_METRICS_ENABLED"] = "false"
    import caikit
    from caikit.runtime.dump_services import dump_grpc_services

    import caikit_tuning  # noqa: F401

    if config_file:
        caikit.configure(config_file)
    caikit.configure(
        config_dict={"runtime": {"metrics": {"enabled": False}, "lazy_load_local_models": False}}
    )
    out = Path(out_dir)
    with tempfile.TemporaryDirectory() as staging:
        dump_grpc_services(staging, False, False)
        (Path(staging) / OPENAPI_FILE).write_text(_openapi() + "\n")
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    return out


def _openapi() -> str:
    from caikit.runtime.http_server import RuntimeHTTPServer

    from .server import patch_http_server

    patch_http_server()
    # Built, never started: nothing listens. The spec is made as start() makes it.
    server = RuntimeHTTPServer()
    server._patch_openapi_spec()
    return json.dumps(server.app.openapi_schema, indent=2, sort_keys=True)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "protos"
    print(export(target, "runtime_config.yaml" if Path("runtime_config.yaml").is_file() else None))
