"""PPO (RLHF): a policy, its frozen reference, a value head, and rewards from a reward model (local or a server).

One loop step (training.loop with its `rollout` hook) is one PPO iteration over batch_size x grad_accum prompts:
  1. rollout     sample a response per prompt (transformers generate, or in-process vLLM synced with the policy)
  2. score       reward model on prompt + response (training.rewards; a failed call stops the run)
  3. shape       score -> running normalization, missing-EOS penalty, clipping; per-token rewards
                 r_t = -beta * KL_t (+ the score on the last response token), KL_t by the k1 or k3 estimator
  4. advantages  GAE over the response tokens with the rollout's values; advantages whitened
  5. optimize    ppo_epochs x (rollouts / mini_batch_size) updates of the clipped policy + value loss (ppo_step)
  6. KL control  beta follows the adaptive controller (or stays fixed)
Everything else (optimizer, schedule, clipping, checkpoints with the KL controller and reward statistics, exact
resume, TensorBoard + metrics.jsonl) is the shared loop's. The export is the policy as a plain causal LM.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from training import loop
from training.checkpoint import atomic_write_text
from training.loop import TrainConfig, given_flags, train_config_from_args
from training.policy import completion_logprobs, export_policy, policy_and_reference
from training.ppo_experience import Experience, ExperienceMaker, ppo_step
from training.prompts import PromptCollator, load_prompts, tokenize_prompts
from training.rewards import RewardCallFailed, make_scorer
from training.rl_math import KL_ESTIMATORS
from training.rollout import HFGenerator, Sampling, VllmGenerator, merged_weights

log = logging.getLogger("rewardserve.train.ppo")

__all__ = ["Experience", "PPOConfig", "PPOModule", "RewardCallFailed", "main", "ppo_step", "train_ppo"]


class PPOConfig(BaseModel):
    """A PPO run; `train.batch_size` is prompts per rollout micro-batch, x `train.grad_accum` per step."""

    policy: str = Field("smollm2", description="smollm2 | a Hugging Face causal-LM checkpoint folder.")
    ref: str | None = Field(None, description="Reference model folder; default: a frozen copy of the policy.")
    prompts: str = Field(description='Prompts: JSONL with "prompt", "messages", "turns" (MT-Bench) or "question".')
    reward_model: str | None = Field(None, description="A reward-model folder scored in this process.")
    reward_url: str | None = Field(None, description="A rewardserve server: http://host:port or grpc://host:port.")
    reward_api_key: str | None = Field(None, description="API key for the server (default $REWARDSERVE_API_KEY).")
    reward_model_name: str | None = Field(None, description="The server's model or ensemble to score with "
                                          "(default: its first model).")
    reward_timeout: float = Field(60.0, gt=0, description="Seconds per reward call, retries included.")
    reward_retries: int = Field(3, ge=0, description="Retries of a failed reward call (overload, failover).")
    rollout: str = Field("hf", pattern="^(hf|vllm)$", description="hf: transformers generate; vllm: in-process vLLM.")
    max_prompt_length: int = Field(256, ge=1, description="Prompt tokens kept (from the end).")
    max_new_tokens: int = Field(64, ge=1, description="Response tokens at most.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (log-probs use the same).")
    top_k: int = Field(0, ge=0, description="Top-k sampling; 0: off.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling.")
    ppo_epochs: int = Field(4, ge=1, description="Passes over each step's rollouts.")
    mini_batch_size: int = Field(4, ge=1, description="Rollouts per PPO update.")
    cliprange: float = Field(0.2, gt=0, description="Policy ratio clip epsilon.")
    cliprange_value: float = Field(0.2, gt=0, description="Value clip around the rollout's values.")
    vf_coef: float = Field(0.1, ge=0, description="Value-loss weight.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    kl_coef: float = Field(0.05, ge=0, description="KL coefficient beta (initial value when adaptive).")
    kl_estimator: str = Field("k1", description=f"Per-token KL estimator: one of {KL_ESTIMATORS}.")
    adaptive_kl: bool = Field(False, description="Adapt beta towards kl_target (Ziegler et al. 2019).")
    kl_target: float = Field(6.0, gt=0, description="Adaptive KL target (sequence KL, nats).")
    kl_horizon: float = Field(10000, gt=0, description="Adaptive KL horizon (rollouts).")
    whiten_advantages: bool = Field(True, description="Whiten advantages over each step's response tokens.")
    missing_eos_penalty: float | None = Field(None, description="Subtracted from the score of a response without EOS.")
    reward_clip: float | None = Field(None, gt=0, description="Clip scores to [-x, x] (after normalization).")
    normalize_rewards: bool = Field(False, description="Normalize scores by their running mean and std.")
    train: TrainConfig


class PPOModule(torch.nn.Module):
    """Policy + value head (a linear layer on the policy's last hidden state) + frozen reference."""

    def __init__(self, policy: torch.nn.Module, ref: torch.nn.Module | None, ref_context: Any = None,
                 temperature: float = 1.0):
        super().__init__()
        self.policy, self.ref, self.ref_context, self.temperature = policy, ref, ref_context, temperature
        hidden = policy.config.get_text_config().hidden_size
        self.value_head = torch.nn.Linear(hidden, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def train(self, mode: bool = True) -> PPOModule:
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """logps, entropy, values: (B, T - 1), zero outside response_mask[:, 1:]."""
        return completion_logprobs(self.policy, input_ids, attention_mask, response_mask, self.temperature,
                                   with_entropy=True, value_head=self.value_head)

    @torch.no_grad()
    def reference(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        if self.ref is not None:
            return completion_logprobs(self.ref, input_ids, attention_mask, response_mask, self.temperature)["logps"]
        with self.ref_context():  # LoRA: the policy with its adapters off
            return completion_logprobs(self.policy, input_ids, attention_mask, response_mask, self.temperature)["logps"]


def build(config: PPOConfig) -> tuple[PPOModule, Any, Any, Path]:
    """(module, tokenizer, peft model or None, policy path)."""
    trained, ref, ref_context, tokenizer, peft_model, path = policy_and_reference(
        config.policy, config.ref, config.train.lora
    )
    return PPOModule(trained, ref, ref_context, config.temperature), tokenizer, peft_model, path


def make_generator(config: PPOConfig, module: PPOModule, tokenizer: Any, out: Path) -> Any:
    sampling = Sampling(config.max_new_tokens, config.temperature, config.top_k, config.top_p)
    if config.rollout == "hf":
        return HFGenerator(tokenizer, sampling)
    start = out / "rollout-model"  # vLLM starts from a checkpoint folder; the weights are synced every step anyway
    start.mkdir(parents=True, exist_ok=True)
    module.policy.save_pretrained(start, state_dict=dict(merged_weights(module.policy)), safe_serialization=True)
    tokenizer.save_pretrained(start)
    max_len = config.max_prompt_length + config.max_new_tokens
    return VllmGenerator(start, sampling, {int(tokenizer.eos_token_id)}, config.train.seed, max_len)


@dataclass
class PPOResult:
    output_dir: Path
    train_metrics: dict[str, float]
    steps: int
    is_main: bool = True


def train_ppo(config: PPOConfig) -> PPOResult:
    """Train the policy with PPO; export it to config.train.output_dir. Raises RewardCallFailed when scoring fails."""
    if config.kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {config.kl_estimator!r}; use one of {KL_ESTIMATORS}")
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    loop.seed_everything(config.train.seed)
    messages = load_prompts(config.prompts)  # before any model is loaded: a bad file fails at once
    if config.reward_model and Path(config.reward_model).is_dir():  # the export would overwrite the scorer
        loop.check_output_dir(config.train.output_dir, config.reward_model, "--reward-model")
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    module, tokenizer, peft_model, policy_path = build(config)
    loop.check_output_dir(config.train.output_dir, policy_path, "--policy")
    prompts = tokenize_prompts(tokenizer, messages, config.max_prompt_length, config.prompts)
    scorer = make_scorer(config.reward_model, config.reward_url, config.reward_timeout, config.reward_retries,
                         config.reward_api_key, config.reward_model_name)
    generator = make_generator(config, module, tokenizer, out)
    maker = ExperienceMaker(config, generator, scorer, tokenizer)
    log.info("PPO on %d prompts from %s, rewards from %s, rollouts by %s", len(prompts), policy_path, scorer.where,
             config.rollout)
    step = partial(ppo_step, cliprange=config.cliprange, cliprange_value=config.cliprange_value, vf_coef=config.vf_coef)
    run_config = {"ppo": config.model_dump(mode="json", exclude={"train", "reward_api_key"}), "policy_path": str(policy_path)}
    try:
        result = loop.train(config.train, module, prompts, PromptCollator(), step, None, run_config,
                            rollout=maker, extra_state=maker)
    finally:
        generator.close()
        scorer.close()

    if result.is_main:
        merged = peft_model.merge_and_unload() if peft_model is not None else result.model.policy
        summary = {**run_config, "train": config.train.model_dump(mode="json"), "steps": result.state.step,
                   "final_train_metrics": result.train_metrics, "kl_coef": maker.kl.value}
        export_policy(merged, tokenizer, out, {"training_config.json": json.dumps(summary, indent=2) + "\n"})
        atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
        log.info("exported the PPO policy to %s", out)
    result.accelerator.wait_for_everyone()
    return PPOResult(out, result.train_metrics, result.state.step, result.is_main)


# ------------------------------------------------------------------------------------------------------ CLI

_PPO_FLAGS = (
    "policy", "ref", "prompts", "reward_model", "reward_url", "reward_api_key", "reward_model_name", "reward_timeout",
    "reward_retries",
    "rollout", "max_prompt_length", "max_new_tokens", "temperature", "top_k", "top_p", "ppo_epochs", "mini_batch_size",
    "cliprange", "cliprange_value", "vf_coef", "gamma", "lam", "kl_coef", "kl_estimator", "adaptive_kl", "kl_target",
    "kl_horizon", "whiten_advantages", "missing_eos_penalty", "reward_clip", "normalize_rewards",
)


def config_from_args(args: Any) -> PPOConfig:
    return PPOConfig(**given_flags(args, _PPO_FLAGS), train=train_config_from_args(args, {"log_every": 1}))


def main(args: Any) -> int:
    result = train_ppo(config_from_args(args))
    if result.is_main:
        reward = result.train_metrics.get("train/reward_mean")
        shown = f" (last reward mean {reward:.4f})" if reward is not None else ""
        print(f"PPO policy saved to {result.output_dir} after {result.steps} steps{shown}")
    return 0
