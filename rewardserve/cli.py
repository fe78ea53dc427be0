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
    except ValidationError as exc:  # one line, naming each field
        return _fail("serve", "bad configuration: " + "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()))
    except (ValueError, OSError) as exc:
        return _fail("serve", f"bad configuration: {exc}")
    _setup_logging(config.log_level)
    from service.errors import RewardServeError
    from service.runtime import serve

    try:
        serve(config)
    except (FileNotFoundError, ValueError) as exc:  # bad model directory, unknown backend, ...
        return _fail("serve", str(exc))
    except RewardServeError as exc:  # e.g. the generator did not start
        return _fail("serve", exc.message)
    return 0


def cmd_train_rm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.rm import main as train_rm_main  # heavy (torch, accelerate, peft): imported only here

    try:
        return train_rm_main(args)
    except ValueError as exc:  # a refused combination of flags or inputs: one line, exit 2
        return _fail("train rm", str(exc))


def cmd_train_gate(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    import shlex

    from training.gate import main as train_gate_main

    args.command_line = "rewardserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    try:
        return train_gate_main(args)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return _fail("train gate", str(exc))


def cmd_train_dpo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.dpo import main as train_dpo_main

    return train_dpo_main(args)


def cmd_train_ppo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.ppo import RewardCallFailed
    from training.ppo import main as train_ppo_main

    try:
        return train_ppo_main(args)
    except RewardCallFailed as exc:  # the run stops at the failed step; no zero reward is made up
        return _fail("train ppo", str(exc))


def cmd_train_grpo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.grpo import RewardCallFailed
    from training.grpo import main as train_grpo_main

    try:
        return train_grpo_main(args)
    except RewardCallFailed as exc:  # the run stops at the failed step; no zero reward is made up
        return _fail("train grpo", str(exc))


def cmd_train_prm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.prm import main as train_prm_main

    try:
        return train_prm_main(args)
    except (FileNotFoundError, ValueError) as exc:  # bad data file or record, a base that is no model folder
        return _fail("train prm", str(exc))


def cmd_eval_prm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.evaluate_prm import main as eval_prm_main

    try:
        return eval_prm_main(args)
    except (FileNotFoundError, ValueError) as exc:
        return _fail("eval prm", str(exc))


def cmd_eval_rm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.evaluate import main as eval_rm_main

    return eval_rm_main(args)


def cmd_eval_bon(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.evaluate_bon import main as eval_bon_main

    try:
        return eval_bon_main(args)
    except (FileNotFoundError, ValueError) as exc:
        return _fail("eval bon", str(exc))


def _add_train_and_eval(sub: argparse._SubParsersAction) -> None:
    """`train rm|dpo|ppo|grpo|prm` and `eval rm|bon|prm`: the flags live beside the trainers (training/cli_args.py), the
    handlers here; flags left out keep the defaults of the trainers' config objects."""
    from training import cli_args  # argparse only

    train = sub.add_parser("train", help="Train a model (rm, gate, dpo, ppo, grpo, prm).")
    train = train.add_subparsers(dest="trainer", required=True)
    cli_args.add_rm(train, cmd_train_rm)
    cli_args.add_gate(train, cmd_train_gate)
    cli_args.add_dpo(train, cmd_train_dpo)
    cli_args.add_ppo(train, cmd_train_ppo)
    cli_args.add_grpo(train, cmd_train_grpo)
    cli_args.add_prm(train, cmd_train_prm)
    evaluate = sub.add_parser("eval", help="Evaluate a reward model (rm), a process reward model (prm) or Best-of-N (bon).")
    evaluate = evaluate.add_subparsers(dest="evaluator", required=True)
    cli_args.add_eval_rm(evaluate, cmd_eval_rm)
    cli_args.add_eval_bon(evaluate, cmd_eval_bon)
    cli_args.add_eval_prm(evaluate, cmd_eval_prm)


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
    _add_train_and_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    _thread_discipline()
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
