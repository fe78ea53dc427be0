"""GRPO (group relative policy optimization): G completions per prompt, a group-relative baseline instead of a
value model, rewards from a reward model (local or a server), rules (answer match, format) or a weighted mix.

One loop step (training.loop with its `rollout` hook, as PPO) is one GRPO iteration over batch_size x grad_accum
prompts:
  1. rollout     G completions per prompt (transformers generate, or in-process vLLM synced with the policy)
  2. score       training.grpo_rewards: one server request per group; rule rewards on the decoded text
  3. shape       + missing-EOS and DAPO overlong penalties (training.grpo_math)
  4. advantages  (r - group mean) / (group or batch std + eps), or mean-only (Dr. GRPO); all-equal groups -> 0
  5. optimize    num_iterations x (rollouts / mini_batch_size) updates of the clipped surrogate + kl_coef x k3 KL
Everything else (optimizer, schedule, clipping, checkpoints, exact resume, TensorBoard + metrics.jsonl) is the
shared loop's. With kl_coef 0 no reference model is loaded. The export is the policy as a plain causal LM.

Prompt records are training.prompts' formats; a reference answer for the answer reward comes from "answer"
(GSM8K: the solution ending in `#### N`, or a bare number) or "reference".
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from training import loop
from training.checkpoint import atomic_write_text
from training.data import Message, parse_records
from training.grpo_experience import GroupMaker, GRPOModule, grpo_step
from training.grpo_math import AGGREGATIONS, SCALES
from training.grpo_rewards import GroupRewards
from training.loop import TrainConfig, given_flags, train_config_from_args
from training.policy import all_prompt_ids, export_policy, policy_and_reference
from training.prompts import PromptCollator, parse_prompt
from training.rewards import RewardCallFailed
from training.trainable import policy_without_reference

log = logging.getLogger("rewardserve.train.grpo")

__all__ = ["GRPOConfig", "GRPOItem", "RewardCallFailed", "grpo_step", "main", "train_grpo"]


class GRPOConfig(BaseModel):
    """A GRPO run; `train.batch_size` is prompts per rollout micro-batch (x group_size completions each)."""

    policy: str = Field("smollm2", description="smollm2 | a Hugging Face causal-LM checkpoint folder.")
    ref: str | None = Field(None, description="Reference model folder; default: a frozen copy of the policy.")
    prompts: str = Field(description='Prompts: JSONL with "prompt", "messages", "turns" or "question" (+ "answer").')
    reward_model: str | None = Field(None, description="A reward-model folder scored in this process.")
    reward_url: str | None = Field(None, description="A rewardserve server: http://host:port or grpc://host:port.")
    reward_api_key: str | None = Field(None, description="API key for the server (default $REWARDSERVE_API_KEY).")
    reward_model_name: str | None = Field(None, description="The server's model or ensemble to score with "
                                          "(default: its first model).")
    reward_timeout: float = Field(60.0, gt=0, description="Seconds per reward call, retries included.")
    reward_retries: int = Field(3, ge=0, description="Retries of a failed reward call (overload, failover).")
    reward_metrics_url: str | None = Field(None, description="The server's HTTP address for /metrics (prefix tokens "
                                           "saved); default: --reward-url when it is http(s).")
    reward_weights: str | None = Field(None, description="Weighted mix, e.g. 'model=1,answer=1' (model | answer | "
                                       "format); default model=1 with a reward model, else answer=1.")
    format_pattern: str | None = Field(None, description="Regex (safe subset) the whole completion should match.")
    rollout: str = Field("hf", pattern="^(hf|vllm)$", description="hf: transformers generate; vllm: in-process vLLM.")
    max_prompt_length: int = Field(256, ge=1, description="Prompt tokens kept (from the end).")
    max_new_tokens: int = Field(64, ge=1, description="Completion tokens at most (L_max).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same).")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0: off.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    group_size: int = Field(8, ge=2, description="Completions per prompt (G).")
    num_iterations: int = Field(1, ge=1, description="Passes over each step's rollouts (GRPO's mu).")
    mini_batch_size: int = Field(8, ge=1, description="Rollouts per optimizer update.")
    cliprange: float = Field(0.2, gt=0, description="Ratio clip epsilon (below; and above unless cliprange_high).")
    cliprange_high: float | None = Field(None, gt=0, description="Upper ratio clip (DAPO's clip-higher).")
    kl_coef: float = Field(0.0, ge=0, description="beta of the k3 KL penalty; 0: no reference model is loaded.")
    scale_rewards: str = Field("group", description=f"Advantage scale: one of {SCALES} (none: Dr. GRPO).")
    loss_aggregation: str = Field("token", description=f"Loss averaging: one of {AGGREGATIONS}.")
    missing_eos_penalty: float | None = Field(None, ge=0, description="Subtracted from a completion without EOS.")
    overlong_cache: int = Field(0, ge=0, description="DAPO's soft overlong penalty over the last N of max_new_tokens; "
                                "0: off.")
    train: TrainConfig


@dataclass(frozen=True)
class GRPOItem:
    messages: list[Message]
    ids: list[int]  # the prompt with its generation prompt, cut from the left to max_prompt_length
    reference: str | None  # the reference answer, when the record has one


def _reference(record: Mapping[str, Any] | str) -> str | None:
    if isinstance(record, str):  # a prompt alone
        return None
    value = record.get("answer", record.get("reference"))
    return None if value is None else str(value)


def _prompt_and_reference(record: Mapping[str, Any] | str) -> tuple[list[Message], str | None]:
    return parse_prompt(record), _reference(record)


def load_grpo_prompts(source: str | Iterable[Mapping[str, Any] | str]) -> list[tuple[list[Message], str | None]]:
    out = parse_records(source, _prompt_and_reference, "prompt")
    if not out:
        raise ValueError(f"{source}: no prompts")
    return out


def build(config: GRPOConfig) -> tuple[GRPOModule, Any, Any, Path]:
    """(module, tokenizer, peft model or None, policy path); the reference only when kl_coef > 0."""
    if config.kl_coef == 0:
        if config.ref:
            raise ValueError("--ref is only used with --kl-coef > 0")
        trained, tokenizer, peft_model, path = policy_without_reference(config.policy, config.train.lora)
        return GRPOModule(trained, temperature=config.temperature), tokenizer, peft_model, path
    trained, ref, ref_context, tokenizer, peft_model, path = policy_and_reference(
        config.policy, config.ref, config.train.lora)
    return GRPOModule(trained, ref, ref_context, config.temperature), tokenizer, peft_model, path


def check(config: GRPOConfig) -> None:
    if config.scale_rewards not in SCALES:
        raise ValueError(f"unknown --scale-rewards {config.scale_rewards!r}; use one of {SCALES}")
    if config.loss_aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown --loss-aggregation {config.loss_aggregation!r}; use one of {AGGREGATIONS}")
    if config.reward_model and config.reward_url:
        raise ValueError("give at most one of --reward-model and --reward-url")
    if config.overlong_cache > config.max_new_tokens:
        raise ValueError("--overlong-cache must not exceed --max-new-tokens")


@dataclass
class GRPOResult:
    output_dir: Path
    train_metrics: dict[str, float]
    steps: int
    is_main: bool = True


def train_grpo(config: GRPOConfig) -> GRPOResult:
    """Train the policy with GRPO; export it to config.train.output_dir. Raises RewardCallFailed when scoring fails."""
    from training.ppo import make_generator  # the same generators as PPO (hf | vllm)

    check(config)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    loop.seed_everything(config.train.seed)
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    rewards = GroupRewards(config)
    records = load_grpo_prompts(config.prompts)
    rewards.check_references([ref for _, ref in records])
    module, tokenizer, peft_model, policy_path = build(config)
    loop.check_output_dir(config.train.output_dir, policy_path, "--policy")
    ids = all_prompt_ids(tokenizer, [m for m, _ in records], config.max_prompt_length, config.prompts)
    items = [GRPOItem(m, i, ref) for (m, ref), i in zip(records, ids)]
    generator = make_generator(config, module, tokenizer, out)
    maker = GroupMaker(config, generator, rewards, tokenizer)
    log.info("GRPO on %d prompts x %d completions from %s, rewards %s, rollouts by %s", len(items),
             config.group_size, policy_path, rewards.where, config.rollout)
    step = partial(grpo_step, cliprange=config.cliprange, cliprange_high=config.cliprange_high,
                   kl_coef=config.kl_coef, aggregation=config.loss_aggregation, max_new_tokens=config.max_new_tokens)
    run_config = {"grpo": config.model_dump(mode="json", exclude={"train", "reward_api_key"}),
                  "policy_path": str(policy_path)}
    try:
        result = loop.train(config.train, module, items, PromptCollator(), step, None, run_config,
                            rollout=maker, extra_state=maker)
    finally:
        generator.close()
        rewards.close()

    if result.is_main:
        merged = peft_model.merge_and_unload() if peft_model is not None else result.model.policy
        summary = {**run_config, "train": config.train.model_dump(mode="json"), "steps": result.state.step,
                   "final_train_metrics": result.train_metrics}
        export_policy(merged, tokenizer, out, {"training_config.json": json.dumps(summary, indent=2) + "\n"})
        atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
        log.info("exported the GRPO policy to %s", out)
    result.accelerator.wait_for_everyone()
    return GRPOResult(out, result.train_metrics, result.state.step, result.is_main)


# ------------------------------------------------------------------------------------------------------ CLI

_GRPO_FLAGS = (
    "policy", "ref", "prompts", "reward_model", "reward_url", "reward_api_key", "reward_model_name", "reward_timeout",
    "reward_retries",
    "reward_metrics_url", "reward_weights", "format_pattern", "rollout", "max_prompt_length", "max_new_tokens",
    "temperature", "top_k", "top_p", "group_size", "num_iterations", "mini_batch_size", "cliprange", "cliprange_high",
    "kl_coef", "scale_rewards", "loss_aggregation", "missing_eos_penalty", "overlong_cache",
)


def config_from_args(args: Any) -> GRPOConfig:
    return GRPOConfig(**given_flags(args, _GRPO_FLAGS), train=train_config_from_args(args, {"log_every": 1}))


def main(args: Any) -> int:
    result = train_grpo(config_from_args(args))
    if result.is_main:
        reward = result.train_metrics.get("train/reward_mean")
        shown = f" (last reward mean {reward:.4f})" if reward is not None else ""
        print(f"GRPO policy saved to {result.output_dir} after {result.steps} steps{shown}")
    return 0
