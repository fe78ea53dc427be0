"""Flags of `rewardserve train rm|dpo|ppo|grpo|prm` and `eval rm|bon|prm` (argparse only: nothing heavy is imported here).
The handlers live in rewardserve/cli.py.

Flags left out stay None, so the defaults are those of training.rm.RMConfig / training.dpo.DPOConfig /
training.ppo.PPOConfig / training.loop.TrainConfig (the help texts quote them).
"""

from __future__ import annotations

import argparse
import math
from typing import Any


def int_at_least(low: int, why: str) -> Any:
    """An argparse type: an integer of at least `low` (`why`: its docstring, what a smaller one would do)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__doc__ = why
    return parse


positive_int = int_at_least(1, "a 0 would read as 'unset' downstream and run a whole epoch")
non_negative_int = int_at_least(0, "0: the default, e.g. torch's threads or the model's length")


def finite_float(text: str) -> float:
    """argparse type: a finite number (nan or inf would make every comparison say the same)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def device(text: str) -> str:
    """argparse type: auto | cpu | cuda | cuda:N."""
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"use auto, cpu, cuda or cuda:N, got {text!r}")


LOOP_FLAGS = (
    ("--epochs", int, "passes over the data (default 1)"),
    ("--max-steps", positive_int, "optimizer steps (at least 1); overrides --epochs"),
    ("--lr", float, "peak learning rate (default 2e-5)"), ("--weight-decay", float, "AdamW weight decay (default 0)"),
    ("--grad-accum", int, "micro-batches per step (default 1)"),
    ("--max-grad-norm", float, "clip norm; 0: off (default 1)"), ("--warmup-steps", int, "linear warmup steps"),
    ("--warmup-ratio", float, "warmup fraction, then cosine (default 0)"),
    ("--lr-schedule", str, "after warmup: cosine (default) | constant"),
    ("--save-every", int, "checkpoint every N steps (and at the end)"),
    ("--keep-checkpoints", int, "checkpoints kept (default 2; 0: all)"), ("--log-every", int, "log every N steps (default 10; train ppo: 1)"),
    ("--seed", int, "seed (default 42)"), ("--threads", int, "torch CPU threads"),
    ("--lora-r", int, "LoRA rank (default 16)"), ("--lora-alpha", float, "LoRA alpha (default 32)"),
    ("--lora-dropout", float, "LoRA dropout (default 0.05)"),
    ("--lora-targets", str, "comma-separated module names (default: peft's for the architecture)"),
)


def _loop_flags(parser: argparse.ArgumentParser, batch_help: str) -> None:
    parser.add_argument("--output", required=True, help="Run folder; the exported model is written into it.")
    parser.add_argument("--batch-size", type=int, help=batch_help)
    for flag, kind, text in LOOP_FLAGS:
        parser.add_argument(flag, type=kind, help=text)
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (merged into the export)")
    parser.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    parser.add_argument("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--log-level", default="info")


def add_dpo(train: Any, handler: Any) -> None:
    dpo = train.add_parser("dpo", help="Train a causal LM with DPO on preference pairs; export it for generation.")
    dpo.add_argument("--policy", help="smollm2 | a Hugging Face causal-LM checkpoint folder (default: smollm2).")
    dpo.add_argument("--ref", help="reference model folder (default: a frozen copy of the policy)")
    dpo.add_argument("--data", required=True, help="Training pairs: .jsonl/.json(.gz)/.parquet (HH-RLHF or TRL columns).")
    dpo.add_argument("--eval", help="Eval pairs: periodic eval (accuracy, margin, implicit rewards).")
    dpo.add_argument("--max-length", type=int, help="token cap for prompt + completion (default 512)")
    dpo.add_argument("--beta", type=float, help="DPO / KTO / SimPO beta (default 0.1; SimPO's paper uses 2-2.5)")
    dpo.add_argument("--loss-type", choices=("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto"),
                     help="loss variant (default sigmoid); simpo and orpo load no reference model; kto trains on "
                     "unpaired examples (preference pairs are split into a desirable and an undesirable one)")
    dpo.add_argument("--label-smoothing", type=float, help="assumed share of flipped labels, sigmoid/robust/simpo (default 0)")
    dpo.add_argument("--simpo-gamma", type=float, help="SimPO target reward margin (default 0.5)")
    dpo.add_argument("--orpo-lambda", type=float, help="ORPO odds-ratio weight (default 0.1)")
    dpo.add_argument("--desirable-weight", type=float, help="KTO weight of desirable examples (default 1)")
    dpo.add_argument("--undesirable-weight", type=float, help="KTO weight of undesirable examples (default 1)")
    dpo.add_argument("--precompute-ref", action="store_true", default=None,
                     help="compute the reference log-probs once before training, then free the reference")
    dpo.add_argument("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    dpo.add_argument("--eval-batch-size", type=int, help="pairs per eval batch; unset: twice --batch-size")
    _loop_flags(dpo, "pairs per micro-batch per process (default 8)")
    dpo.set_defaults(func=handler)


def add_ppo(train: Any, handler: Any) -> None:
    ppo = train.add_parser("ppo", help="Train a causal LM with PPO against a reward model (local, or a server).")
    ppo.add_argument("--policy", help="smollm2 | a Hugging Face causal-LM checkpoint folder (default: smollm2).")
    ppo.add_argument("--ref", help="reference model folder (default: a frozen copy of the policy)")
    ppo.add_argument("--prompts", required=True, help='JSONL with "prompt", "messages" or MT-Bench "turns" per line.')
    reward = ppo.add_mutually_exclusive_group(required=True)
    reward.add_argument("--reward-model", help="a reward-model folder scored in this process")
    reward.add_argument("--reward-url", help="a rewardserve server: http://host:port or grpc://host:port")
    ppo.add_argument("--reward-api-key", help="API key for the reward server (default: $REWARDSERVE_API_KEY)")
    ppo.add_argument("--reward-model-name", help="the server's model or ensemble to score with (default: its first)")
    ppo.add_argument("--reward-timeout", type=float, help="seconds per reward call, retries included (default 60)")
    ppo.add_argument("--reward-retries", type=int, help="retries of a failed reward call (default 3)")
    ppo.add_argument("--rollout", choices=("hf", "vllm"), help="generator: transformers generate or in-process vLLM (default hf)")
    for flag, kind, text in (
        ("--max-prompt-length", int, "prompt tokens kept, from the end (default 256)"),
        ("--max-new-tokens", int, "response tokens at most (default 64)"),
        ("--temperature", float, "sampling temperature (default 1)"), ("--top-k", int, "top-k sampling; 0: off (default 0)"),
        ("--top-p", float, "nucleus sampling (default 1)"), ("--ppo-epochs", int, "passes over each rollout batch (default 4)"),
        ("--mini-batch-size", int, "rollouts per PPO update (default 4)"),
        ("--cliprange", float, "policy ratio clip (default 0.2)"), ("--cliprange-value", float, "value clip (default 0.2)"),
        ("--vf-coef", float, "value-loss weight (default 0.1)"), ("--gamma", float, "discount (default 1)"),
        ("--lam", float, "GAE lambda (default 0.95)"), ("--kl-coef", float, "initial KL coefficient (default 0.05)"),
        ("--kl-estimator", str, "k1 | k2 | k3 per-token KL estimator (default k1)"),
        ("--kl-target", float, "adaptive KL target (default 6)"),
        ("--kl-horizon", float, "adaptive KL horizon (default 10000)"),
        ("--missing-eos-penalty", float, "subtracted from the score of a response without EOS (default off)"),
        ("--reward-clip", float, "clip scores to [-x, x] (default off)"),
    ):
        ppo.add_argument(flag, type=kind, help=text)
    ppo.add_argument("--adaptive-kl", action=argparse.BooleanOptionalAction, help="adaptive KL controller (default off)")
    ppo.add_argument("--normalize-rewards", action=argparse.BooleanOptionalAction,
                     help="normalize scores by their running mean/std (default off)")
    ppo.add_argument("--whiten-advantages", action=argparse.BooleanOptionalAction, help="(default on)")
    _loop_flags(ppo, "prompts per rollout micro-batch per process (default 8); x --grad-accum prompts per step")
    ppo.set_defaults(func=handler)


def add_grpo(train: Any, handler: Any) -> None:
    grpo = train.add_parser("grpo", help="Train a causal LM with GRPO: G completions per prompt, rewards from a reward "
                            "model (local or a server), rules (answer match, format) or a weighted mix.")
    grpo.add_argument("--policy", help="smollm2 | a Hugging Face causal-LM checkpoint folder (default: smollm2).")
    grpo.add_argument("--ref", help="reference model folder, with --kl-coef > 0 (default: a frozen copy of the policy)")
    grpo.add_argument("--prompts", required=True, help='JSONL with "prompt", "messages", "turns" or "question" per '
                      'line; "answer" (GSM8K `#### N`) or "reference" feeds the answer reward.')
    reward = grpo.add_mutually_exclusive_group()
    reward.add_argument("--reward-model", help="a reward-model folder scored in this process")
    reward.add_argument("--reward-url", help="a rewardserve server: http://host:port or grpc://host:port "
                        "(one request per group)")
    grpo.add_argument("--reward-api-key", help="API key for the reward server (default: $REWARDSERVE_API_KEY)")
    grpo.add_argument("--reward-model-name", help="the server's model or ensemble to score with (default: its first)")
    grpo.add_argument("--reward-timeout", type=float, help="seconds per reward call, retries included (default 60)")
    grpo.add_argument("--reward-retries", type=int, help="retries of a failed reward call (default 3)")
    grpo.add_argument("--reward-metrics-url", help="the server's HTTP address, to log the prefix tokens it saved "
                      "(default: --reward-url when it is http)")
    grpo.add_argument("--reward-weights", help="weighted mix, e.g. model=1,answer=1 (model | answer | format; default "
                      "model=1 with a reward model, else answer=1)")
    grpo.add_argument("--format-pattern", help="regex the whole completion should match (format reward; safe subset)")
    grpo.add_argument("--rollout", choices=("hf", "vllm"), help="generator: transformers generate or in-process vLLM "
                      "(default hf)")
    for flag, kind, text in (
        ("--max-prompt-length", int, "prompt tokens kept, from the end (default 256)"),
        ("--max-new-tokens", int, "completion tokens at most (default 64)"),
        ("--temperature", float, "sampling temperature (default 1)"), ("--top-k", int, "top-k sampling; 0: off (default 0)"),
        ("--top-p", float, "nucleus sampling (default 1)"),
        ("--group-size", int, "completions per prompt, G (default 8)"),
        ("--num-iterations", int, "passes over each rollout batch (default 1)"),
        ("--mini-batch-size", int, "rollouts per optimizer update (default 8)"),
        ("--cliprange", float, "ratio clip (default 0.2)"), ("--cliprange-high", float, "upper ratio clip (default: --cliprange)"),
        ("--kl-coef", float, "k3 KL coefficient; 0 loads no reference model (default 0)"),
        ("--scale-rewards", str, "advantage scale: group | batch | none (Dr. GRPO) (default group)"),
        ("--loss-aggregation", str, "token | sequence | constant (Dr. GRPO) (default token)"),
        ("--missing-eos-penalty", float, "subtracted from the reward of a completion without EOS (default off)"),
        ("--overlong-cache", int, "DAPO soft overlong penalty over the last N tokens of --max-new-tokens (default off)"),
    ):
        grpo.add_argument(flag, type=kind, help=text)
    _loop_flags(grpo, "prompts per rollout micro-batch per process (default 8); x --grad-accum prompts per step")
    grpo.set_defaults(func=handler)


def add_rm(train: Any, handler: Any) -> None:
    rm = train.add_parser("rm", help="Train a Bradley-Terry reward model and export it for `serve`.")
    rm.add_argument("--base", help="minilm | smollm2 | a Hugging Face checkpoint folder (default: minilm).")
    rm.add_argument("--data", required=True, help="Training pairs: .jsonl/.json(.gz)/.parquet (HH-RLHF or TRL columns).")
    rm.add_argument("--eval", help="Eval pairs: periodic eval, final accuracy and reward_stats.json.")
    rm.add_argument("--output", required=True, help="Run folder; the exported model is written into it.")
    for flag, kind, text in (
        ("--epochs", int, "passes over the data (default 1)"),
        ("--max-steps", positive_int, "optimizer steps (at least 1); overrides --epochs"),
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
    rm.add_argument("--lora", action="store_true", default=None, help="train LoRA adapters (merged into the export)")
    rm.add_argument("--head-only", action="store_true",
                    help="freeze the base (minilm or smollm2), cache its features once, train only the reward head "
                    "for many fast epochs, keep the epoch with the best eval accuracy, export a small overlay "
                    "(defaults: --epochs 1000 --lr 1e-3 --patience 200)")
    rm.add_argument("--patience", type=int, help="--head-only: stop after this many epochs without a better eval")
    rm.add_argument("--num-layers", type=int, help="--head-only over smollm2: keep only the first N decoder layers "
                    "(then the final norm and the head)")
    rm.add_argument("--read-layers", type=int, nargs="+", metavar="K",
                    help="--head-only --l2 over smollm2: fit the heads on each of these layer counts (the last token "
                    "after K layers, through the final norm; one feature pass for all) and write them as one "
                    "multi-head overlay (heads L<K>, served in one forward pass) whose own name serves their "
                    "normalized mean; --pick-l2 picks per layer")
    rm.add_argument("--l2", type=float, nargs="+", help="--head-only over smollm2: instead of epochs, solve the "
                    "L2-regularised Bradley-Terry fit of the linear head to convergence (L-BFGS) with this penalty "
                    "(e.g. 0.3); several values: one head each (a multi-head overlay), or see --pick-l2")
    rm.add_argument("--pick-l2", nargs="?", const="best", choices=("best", "one-se"),
                    help="--head-only with several --l2: keep one head, chosen on --eval, as a single-head overlay: "
                    "best = the best eval accuracy (ties: lower eval loss; the default); one-se = the largest l2 "
                    "within one prompt-clustered bootstrap standard error of the best accuracy")
    rm.add_argument("--bootstrap", type=int, help="--head-only with --l2: K heads per penalty, each fit on a "
                    "bootstrap resample of the training pairs (seed + k; each data file resampled on its own)")
    rm.add_argument("--also-data", action="append", default=[], metavar="FILE",
                    help="--head-only: another training file (repeatable), added to --data")
    rm.add_argument("--also-eval", action="append", default=[], metavar="FILE",
                    help="--head-only: another eval file (repeatable), added to --eval (and to the stats' pairs)")
    rm.add_argument("--include-head", action="append", default=[], metavar="NAME=DIR",
                    help="--head-only with --l2: copy the head of the overlay DIR (same base and max length) into "
                    "this overlay as head NAME (repeatable; listed first)")
    rm.add_argument("--gate", metavar="GATE=HEAD[,HEAD...]",
                    help="--head-only multi-head overlay: serve it (under its own name) as an ensemble routed by the "
                    "included gate head GATE (an overlay from `train gate`, via --include-head): where GATE's reward "
                    "is above its threshold, the mean of the HEADs answers, elsewhere the mean of the other heads; "
                    "members normalized by their reward_stats")
    rm.add_argument("--feature-cache", help="--head-only: a .pt feature store: one row per distinct token sequence, "
                    "reused by any data over the same base weights and max length (training/features.py)")
    rm.add_argument("--bf16", action="store_true", default=None, help="bf16 autocast")
    rm.add_argument("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint")
    rm.add_argument("--disable-dropout", action=argparse.BooleanOptionalAction, help="dropout off (default on)")
    rm.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                    help="batch pairs of similar length together: less padding, same pairs per epoch (default on)")
    rm.add_argument("--no-progress", action="store_true", help="no progress bar")
    rm.add_argument("--log-level", default="info")
    rm.set_defaults(func=handler)


def add_gate(train: Any, handler: Any) -> None:
    gate = train.add_parser("gate", help="Train a linear gate over a frozen decoder base that tells two kinds of "
                            "conversation apart (for an ensemble's routing, `train rm --gate`); export an overlay.")
    gate.add_argument("--base", default="smollm2", help="the packaged decoder base the gate reads: smollm2 (the default)")
    gate.add_argument("--positive", nargs="+", required=True, metavar="FILE",
                      help="preference files whose sequences (chosen and rejected) are the class the gate routes")
    gate.add_argument("--negative", nargs="+", required=True, metavar="FILE",
                      help="preference files of the other class (with --reads prompt, also files of prompts alone: "
                      "{\"prompt\": ...} per line)")
    gate.add_argument("--eval-positive", nargs="+", metavar="FILE", help="held-out files of the routed class (reported)")
    gate.add_argument("--eval-negative", nargs="+", metavar="FILE", help="held-out files of the other class (reported)")
    gate.add_argument("--reads", choices=("prompt", "input"), default="prompt",
                      help="prompt (default): each conversation with its response emptied, so all responses to a "
                      "prompt are routed alike; input: whole sequences (chosen and rejected)")
    gate.add_argument("--output", required=True, help="overlay folder to write")
    gate.add_argument("--l2", type=float, nargs="+", help="penalty candidates on standardized weights, chosen by "
                      "5-fold cross-validation grouped by prompt (default 0.001 0.01 0.1)")
    gate.add_argument("--max-length", type=positive_int, default=512, help="token cap per sequence (default 512)")
    gate.add_argument("--feature-cache", help="a .pt feature store shared with `train rm --head-only`")
    gate.add_argument("--threads", type=non_negative_int, help="torch CPU threads")
    gate.add_argument("--seed", type=int, default=42, help="fold assignment seed (default 42)")
    gate.add_argument("--log-level", default="info")
    gate.set_defaults(func=handler)


def add_eval_rm(evaluate: Any, handler: Any) -> None:
    erm = evaluate.add_parser("rm", help="Accuracy, reward distributions, length bias, calibration: JSON + PNG + HTML.")
    erm.add_argument("--model", required=True, help="A reward-model folder (e.g. the output of `train rm`).")
    erm.add_argument("--data", required=True, help="Preference pairs to evaluate on.")
    erm.add_argument("--report", required=True, help="Folder for report.json, the PNG plots and report.html.")
    erm.add_argument("--max-length", type=non_negative_int, default=0,
                     help="token cap per side (default 0: the model's own limit, where training and serving cut)")
    erm.add_argument("--batch-size", type=positive_int, default=16, help="rows per forward (default 16)")
    erm.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda")
    erm.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads")
    erm.add_argument("--log-level", default="info")
    erm.set_defaults(func=handler)


def add_eval_bon(evaluate: Any, handler: Any) -> None:
    ebon = evaluate.add_parser("bon", help="Best-of-N: expected best reward vs N and the KL it costs: JSON + PNG.")
    ebon.add_argument("--policy", required=True, help="smollm2 | a causal-LM folder | openai:URL (the generator).")
    ebon.add_argument("--prompts", required=True, help="JSONL prompts (turns | question | prompt | messages).")
    ebon.add_argument("--n", default="1,2,4,8,16", help="comma-separated N; max(N) samples per prompt")
    ebon.add_argument("--report", required=True, help="Folder for report.json and bon_curve.png.")
    ebon.add_argument("--model", default="default", help="reward model (as `serve --model`; default: default)")
    ebon.add_argument("--generator", default="vllm", choices=["vllm", "hf"], help="how --policy runs (default vllm)")
    ebon.add_argument("--max-tokens", type=positive_int, default=128, help="new tokens per candidate (default 128)")
    ebon.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1)")
    ebon.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (default 1)")
    ebon.add_argument("--seed", type=int, default=0, help="base seed (default 0)")
    ebon.add_argument("--limit", type=positive_int, help="only the first K prompts")
    ebon.add_argument("--concurrency", type=positive_int, default=4, help="prompts in flight at once (default 4)")
    ebon.add_argument("--log-level", default="info")
    ebon.set_defaults(func=handler)


def add_prm(train: Any, handler: Any) -> None:
    prm = train.add_parser("prm", help="Train a process reward model (a score per step) on TRL stepwise data; export "
                           "it for `serve`.")
    prm.add_argument("--base", help="minilm | smollm2 | a Hugging Face checkpoint folder (default: minilm).")
    prm.add_argument("--data", required=True, help='Training data: .jsonl/.json(.gz)/.parquet with "prompt", '
                     '"completions" (the steps) and "labels" (a bool per step), as TRL.')
    prm.add_argument("--eval", help="Eval data (same format): periodic eval (step accuracy) and the export check.")
    prm.add_argument("--max-length", type=int, help="token cap per example (default 512)")
    prm.add_argument("--step-separator", help=r"appended to every step, read at its last token; \n and \t are "
                     r"understood (default \n)")
    prm.add_argument("--train-on-last-step-only", action="store_true", default=None,
                     help="train only the last step's label (as TRL)")
    prm.add_argument("--freeze-base", action="store_true", default=None,
                     help="train only the token-classification head; the base stays frozen (cheap on CPU)")
    prm.add_argument("--num-layers", type=int, help="keep only the base's first N layers (decoder bases)")
    prm.add_argument("--eval-every", type=int, help="evaluate every N steps (and at the end)")
    prm.add_argument("--eval-batch-size", type=int, help="examples per eval batch; unset: twice --batch-size")
    prm.add_argument("--disable-dropout", action=argparse.BooleanOptionalAction, help="dropout off (default on)")
    prm.add_argument("--group-by-length", action=argparse.BooleanOptionalAction,
                     help="batch examples of similar length together (default on)")
    _loop_flags(prm, "examples per micro-batch per process (default 8)")
    prm.set_defaults(func=handler)


def add_eval_prm(evaluate: Any, handler: Any) -> None:
    eprm = evaluate.add_parser("prm", help="Step accuracy and ProcessBench first-error F1 of a PRM: report.json.")
    eprm.add_argument("--model", required=True, help="A PRM folder (the output of `train prm`); minilm, smollm2 or a "
                      "folder without rewardserve_prm.json gets an untrained head (a baseline).")
    eprm.add_argument("--data", required=True, help="Stepwise data (prompt, completions, labels) to evaluate on.")
    eprm.add_argument("--report", required=True, help="Folder for report.json.")
    eprm.add_argument("--max-length", type=non_negative_int, default=0,
                      help="token cap per example (default: the model's)")
    eprm.add_argument("--limit", type=positive_int, help="only the first N examples")
    eprm.add_argument("--threshold", type=finite_float, default=0.0, help="a step is good when its raw score is above this "
                      "(default 0)")
    eprm.add_argument("--num-layers", type=positive_int, help="an untrained baseline over a base's first N layers only")
    eprm.add_argument("--batch-size", type=positive_int, default=16, help="examples per forward (default 16)")
    eprm.add_argument("--device", type=device, default="auto", help="auto | cpu | cuda")
    eprm.add_argument("--threads", type=non_negative_int, default=0, help="torch CPU threads")
    eprm.add_argument("--log-level", default="info")
    eprm.set_defaults(func=handler)
