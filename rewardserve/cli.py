"""The `rewardserve` command: one root parser, subcommands. Heavy imports happen inside subcommands."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any


def _thread_discipline() -> None:
    # Idle OpenMP threads must sleep, not spin: spinning threads starve the event loop and the
    # tokenizer threads on a small CPU (see PERF_NOTES). Must be set before torch is imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _setup_logging(level: str) -> None:
    """`level` for the rewardserve loggers; other libraries' loggers stay at INFO or above (their debug output,
    grpc's and asyncio's, is not ours to turn on)."""
    chosen = getattr(logging, level.upper(), logging.DEBUG if level == "trace" else logging.INFO)
    logging.basicConfig(level=max(chosen, logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("rewardserve").setLevel(chosen)


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


# Config fields whose flag is not the field's own name (training/cli_args.py); LoraSettings' fields are --lora-*.
_FLAG_OF_FIELD = {"output_dir": "output", "progress": "no_progress"}
_LORA_FLAG_OF_FIELD = {"target_modules": "lora_targets"}


def _flag(title: str, loc: tuple) -> str:
    """A config field's location -> the flag that sets it: ('train', 'lr') -> --lr; LoraSettings ('r',) -> --lora-r."""
    names = [str(part) for part in loc if not isinstance(part, int)]  # list indices say nothing about the flag
    lora = title == "LoraSettings" or "lora" in names[:-1]
    names = [n for n in names if n not in ("train", "lora")] or names
    field = names[-1] if names else ""
    if lora:
        field = _LORA_FLAG_OF_FIELD.get(field, f"lora_{field}")
    return "--" + _FLAG_OF_FIELD.get(field, field).replace("_", "-")


_FLAG_CONFIGS = ("RMConfig", "DPOConfig", "PPOConfig", "GRPOConfig", "PRMConfig", "TrainConfig", "LoraSettings")


def _bad_flags(exc: Any) -> str:
    """A pydantic ValidationError as one line naming each field, no pydantic URL; a trainer's config field by its
    flag: '--lr: Input should be greater than 0 (got -1.0)'."""
    parts = []
    for error in exc.errors():
        got = error.get("input")
        shown = "" if error.get("type") == "missing" or isinstance(got, (dict, list)) else f" (got {got!r})"
        where = _flag(exc.title, error["loc"]) if exc.title in _FLAG_CONFIGS else ".".join(map(str, error["loc"]))
        parts.append(f"{where}: {error['msg']}{shown}" if where else f"{error['msg']}{shown}")
    return "; ".join(parts)


def _one_line(exc: BaseException) -> str:
    """The message of a refused input, on one line (peft's and json's messages span several)."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}"  # not "[Errno 2] No such file or directory: 'x'"
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() adds quotes
    return " ".join(str(text).split()) or type(exc).__name__


# A user's mistake in a command's inputs: a bad or missing file, folder or record, a refused flag value or combination
# (pydantic's ValidationError is a ValueError; so are rewardmodel's RenderError and UnsafePattern, and peft's
# NoMatchingPeftModuleError for --lora-targets). Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, FileNotFoundError, NotADirectoryError, IsADirectoryError)


INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT (128 + 2)


def _interrupted(command: str, exc: KeyboardInterrupt) -> int:
    """Ctrl-C: one line, no traceback; a training run says where it stood (training.types.TrainingInterrupted) and
    how to continue."""
    if getattr(exc, "step", None) is not None:
        said = str(exc)  # "interrupted at step N of T (the last checkpoint is step M): continue with --resume"
    elif command.startswith("train "):
        said = "interrupted (outside the training loop): a checkpoint under --output, if any, continues with --resume"
    else:
        said = "interrupted"
    print(f"rewardserve {command}: {said}", file=sys.stderr)
    return INTERRUPTED


def _run(command: str, entry: Any, args: argparse.Namespace, *errors: type[BaseException]) -> int:
    """entry(args), with a user's mistake (USER_ERRORS, or one of `errors`: the command's own kinds) reported the
    way argparse reports a bad flag: one line `rewardserve <command>: error: <message>`, exit status 2; Ctrl-C
    (SIGINT) as one line `rewardserve <command>: interrupted ...`, exit status 130."""
    from pydantic import ValidationError

    try:
        return entry(args)
    except ValidationError as exc:  # before ValueError, which it subclasses: one line naming the flags
        return _fail(command, _bad_flags(exc))
    except (*USER_ERRORS, *errors) as exc:
        return _fail(command, _one_line(exc))
    except KeyboardInterrupt as exc:
        return _interrupted(command, exc)


def cmd_train_rm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.loop import TrainingDiverged
    from training.rm import main as train_rm_main  # heavy (torch, accelerate, peft): imported only here

    return _run("train rm", train_rm_main, args, TrainingDiverged)


def cmd_train_gate(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    import shlex

    from training.gate import main as train_gate_main

    args.command_line = "rewardserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    return _run("train gate", train_gate_main, args, KeyError)


def cmd_train_dpo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.dpo import main as train_dpo_main
    from training.loop import TrainingDiverged

    return _run("train dpo", train_dpo_main, args, TrainingDiverged)


def cmd_train_ppo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.loop import TrainingDiverged
    from training.ppo import RewardCallFailed
    from training.ppo import main as train_ppo_main

    # RewardCallFailed: the run stops at the failed step; no zero reward is made up
    return _run("train ppo", train_ppo_main, args, RewardCallFailed, TrainingDiverged)


def cmd_train_grpo(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.grpo import RewardCallFailed
    from training.grpo import main as train_grpo_main
    from training.loop import TrainingDiverged

    # RewardCallFailed: the run stops at the failed step; no zero reward is made up
    return _run("train grpo", train_grpo_main, args, RewardCallFailed, TrainingDiverged)


def cmd_train_prm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.loop import TrainingDiverged
    from training.prm import main as train_prm_main

    return _run("train prm", train_prm_main, args, TrainingDiverged)


def cmd_eval_prm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.evaluate_prm import main as eval_prm_main

    return _run("eval prm", eval_prm_main, args)


def cmd_eval_rm(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from training.evaluate import main as eval_rm_main

    return _run("eval rm", eval_rm_main, args)


def cmd_eval_bon(args: argparse.Namespace) -> int:
    _setup_logging(args.log_level)
    from service.errors import RewardServeError  # e.g. the generator did not start
    from training.evaluate_bon import main as eval_bon_main

    return _run("eval bon", eval_bon_main, args, RewardServeError)


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
    _no_abbreviations(parser)
    return parser


def _no_abbreviations(parser: argparse.ArgumentParser) -> None:
    """A flag is taken only as spelled: argparse would read a typo's prefix (`--max-queu 10`) as the flag it starts
    (`--max-queue`), and a prefix that a later flag makes ambiguous would change meaning from one version to the
    next."""
    parser.allow_abbrev = False
    for action in parser._actions:  # argparse keeps subcommands' parsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _no_abbreviations(child)


def main(argv: list[str] | None = None) -> int:
    _thread_discipline()
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
