"""Flags of `rewardserve train dpo` and `train ppo` (argparse only: nothing heavy is imported here).

Flags left out stay None, so the defaults are those of training.dpo.DPOConfig / training.ppo.PPOConfig /
training.loop.TrainConfig (the help texts quote them).
"""

from __future__ import annotations

import argparse
from typing import Any

LOOP_FLAGS = (
    ("--epochs", int, "passes over the data (default 1)"), ("--max-steps", int, "optimizer steps; overrides --epochs"),
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
    dpo.add_argument("--beta", type=float, help="DPO beta (default 0.1)")
    dpo.add_argument("--loss-type", choices=("sigmoid", "ipo", "hinge", "robust"), help="loss variant (default sigmoid)")
    dpo.add_argument("--label-smoothing", type=float, help="assumed share of flipped labels, sigmoid/robust (default 0)")
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
        ("--kl-estimator", str, "k1 | k3 per-token KL (default k1)"), ("--kl-target", float, "adaptive KL target (default 6)"),
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
