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

    return train_rm_main(args)


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
    """`train rm` and `eval rm`; flags left out keep the defaults of training.rm.RMConfig / training.loop.TrainConfig."""
    train = sub.add_parser("train", help="Train a model (rm, dpo, ppo).").add_subparsers(dest="trainer", required=True)
    rm = train.add_parser("rm", help="Train a Bradley-Terry reward model and export it for `serve`.")
    rm.add_argument("--base", help="minilm | smollm2 | a Hugging Face checkpoint folder (default: minilm).")
    rm.add_argument("--data", required=True, help="Training pairs: .jsonl/.json(.gz)/.parquet (HH-RLHF or TRL columns).")
    rm.add_argument("--eval", help="Eval pairs: periodic eval, final accuracy and reward_stats.json.")
    rm.add_argument("--output", required=True, help="Run folder; the exported model is written into it.")
    for flag, kind, text in (
        ("--epochs", int, "passes over the data (default 1)"), ("--max-steps", int, "optimizer steps; overrides --epochs"),
        ("--lr", float, "peak learning rate (default 2e-5)"), ("--weight-decay", float, "AdamW weight decay (default 0)"),
        ("--batch-size", int, "pairs per micro-batch per process (default 8)"),
        ("--grad-accum", int, "micro-batches per optimizer step (default 1)"),
        ("--max-length", int, "token cap per side (default 512)"), ("--max-grad-norm", float, "clip norm; 0: off (default 1)"),
        ("--warmup-steps", int, "linear warmup steps"), ("--warmup-ratio", float, "warmup fraction, then cosine (default 0)"),
        ("--lr-schedule", str, "after warmup: cosine (default) | constant"),
        ("--eval-every", int, "evaluate every N steps (and at the end)"), ("--save-every", int, "checkpoint every N steps (and at the end)"),
        ("--keep-checkpoints", int, "checkpoints kept (default 2; 0: all)"), ("--log-every", int, "log every N steps (default 10)"),
        ("--eval-batch-size", int, "pairs per eval batch; unset: twice --batch-size"), ("--seed", int, "seed (default 42)"),
        ("--center-rewards-coefficient", float, "reward-centering penalty weight (default off)"),
        ("--threads", int, "torch CPU threads"), ("--lora-r", int, "LoRA rank (default 16)"),
        ("--lora-alpha", float, "LoRA alpha (default 32)"), ("--lora-dropout", float, "LoRA dropout (default 0.05)"),
        ("--lora-targets", str, "comma-separated module names (default: peft's for the architecture)"),
    ):
        rm.add_argument(flag, type=kind, help=text)
    rm.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the export)")
    rm.add_argument("--head-only", action="store_true",
                    help="freeze the base (minilm or smollm2), cache its features once, train only the reward head "
                    "for many fast epochs, keep the epoch with the best eval accuracy, export a small overlay "
                    "(defaults: --epochs 1000 --lr 1e-3 --patience 200)")
    rm.add_argument("--patience", type=int, help="--head-only: stop after this many epochs without a better eval")
    rm.add_argument("--num-layers", type=int, help="--head-only over smollm2: keep only the first N decoder layers "
                    "(then the final norm and the head)")
    rm.add_argument("--l2", type=float, help="--head-only over smollm2: instead of epochs, solve the L2-regularised "
                    "Bradley-Terry fit of the linear head to convergence (L-BFGS) with this penalty (e.g. 0.3)")
    rm.add_argument("--feature-cache", help="--head-only: a .pt file to keep the frozen features in and reuse when "
                    "the base weights, data and max length are the same (new head settings without a new pass)")
    rm.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    rm.add_argument("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint")
    rm.add_argument("--disable-dropout", action=argparse.BooleanOptionalAction, help="dropout off (default on)")
    rm.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                    help="batch pairs of similar length together: less padding, same pairs per epoch (default on)")
    rm.add_argument("--no-progress", action="store_true", help="no progress bar")
    rm.add_argument("--log-level", default="info")
    rm.set_defaults(func=cmd_train_rm)
    from training.cli_args import add_dpo, add_ppo  # argparse only

    add_dpo(train, cmd_train_dpo)
    add_ppo(train, cmd_train_ppo)

    evaluate = sub.add_parser("eval", help="Evaluate a model (rm) or Best-of-N (bon).")
    evaluate = evaluate.add_subparsers(dest="evaluator", required=True)
    erm = evaluate.add_parser("rm", help="Accuracy, reward distributions, length bias, calibration: JSON + PNG + HTML.")
    erm.add_argument("--model", required=True, help="A reward-model folder (e.g. the output of `train rm`).")
    erm.add_argument("--data", required=True, help="Preference pairs to evaluate on.")
    erm.add_argument("--report", required=True, help="Folder for report.json, the PNG plots and report.html.")
    erm.add_argument("--max-length", type=int, default=512, help="token cap per side (default 512)")
    erm.add_argument("--batch-size", type=int, default=16, help="rows per forward (default 16)")
    erm.add_argument("--device", default="auto", help="auto | cpu | cuda")
    erm.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    erm.add_argument("--log-level", default="info")
    erm.set_defaults(func=cmd_eval_rm)

    ebon = evaluate.add_parser("bon", help="Best-of-N: expected best reward vs N and the KL it costs: JSON + PNG.")
    ebon.add_argument("--policy", required=True, help="smollm2 | a causal-LM folder | openai:URL (the generator).")
    ebon.add_argument("--prompts", required=True, help="JSONL prompts (turns | question | prompt | messages).")
    ebon.add_argument("--n", default="1,2,4,8,16", help="comma-separated N; max(N) samples per prompt")
    ebon.add_argument("--report", required=True, help="Folder for report.json and bon_curve.png.")
    ebon.add_argument("--model", default="default", help="reward model (as `serve --model`; default: default)")
    ebon.add_argument("--generator", default="vllm", choices=["vllm", "hf"], help="how --policy runs (default vllm)")
    ebon.add_argument("--max-tokens", type=int, default=128, help="new tokens per candidate (default 128)")
    ebon.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    ebon.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1)")
    ebon.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ebon.add_argument("--limit", type=int, help="only the first K prompts")
    ebon.add_argument("--concurrency", type=int, default=4, help="prompts in flight at once (default 4)")
    ebon.add_argument("--log-level", default="info")
    ebon.set_defaults(func=cmd_eval_bon)


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
