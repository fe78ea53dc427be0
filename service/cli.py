"""The `rewardserve` command: one root parser, subcommands. Heavy imports happen inside subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def _thread_discipline() -> None:
    # Idle OpenMP threads must sleep, not spin: spinning threads starve the event loop and the
    # tokenizer threads on a small CPU (see PERF_NOTES). Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _fail(command: str, message: str) -> int:
    print(f"rewardserve {command}: error: {message}", file=sys.stderr)
    return 2


def cmd_serve(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from service.config import resolve

    try:
        config = resolve(args)
    except (ValidationError, ValueError, OSError) as exc:
        return _fail("serve", f"bad configuration: {exc}")
    _setup_logging(config.log_level)
    from service.runtime import serve

    try:
        serve(config)
    except (FileNotFoundError, ValueError) as exc:  # bad model directory, unknown backend, ...
        return _fail("serve", str(exc))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from service.config import add_arguments

    parser = argparse.ArgumentParser(prog="rewardserve", description="Reward-model serving and RLHF training.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve", help="Serve a reward model over HTTP and gRPC.",
        description="Serve a reward model over HTTP and gRPC with dynamic batching. "
        "Every option can also come from a config file or a REWARDSERVE_* environment variable.",
    )
    add_arguments(serve)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    _thread_discipline()
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
