"""GRPO's experience: G completions per prompt -> rewards -> group-relative advantages, and the GRPO step on a
minibatch of it.

`GroupMaker` is the loop's rollout hook (training.loop.train): it receives one step's prompt micro-batches, samples
G completions of each prompt with the current policy, scores them (training.grpo_rewards), computes the advantages
(training.grpo_math), the rollout-time log-probs (and the reference's, when kl_coef > 0), and returns
num_iterations x (rollouts / mini_batch_size) optimizer updates. Its state (the call count) is saved in every
checkpoint; the sampling draws from the run's torch RNG, which the loop restores, so a resumed run samples exactly
what an uninterrupted one did.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch

from training.data import pad_right
from training.grpo_math import group_advantages, grpo_policy_loss, missing_eos_penalty, overlong_penalty
from training.policy import completion_logprobs
from training.rl_math import kl_estimate, masked_mean

Metrics = dict[str, torch.Tensor]


@dataclass
class GroupExperience:
    """N = prompts x G rollouts as right-padded rows prompt + completion. Per-token tensors are (N, T - 1), aligned
    with the labels input_ids[:, 1:] and zero outside response_mask[:, 1:]."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    response_mask: torch.Tensor  # (N, T): 1 on completion tokens
    old_logps: torch.Tensor  # (N, T-1) policy log-probs at rollout time
    advantages: torch.Tensor  # (N,)
    ref_logps: torch.Tensor | None = None  # (N, T-1), only when kl_coef > 0

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> GroupExperience:
        """Rows idx, trimmed to their longest row."""
        width = int(self.attention_mask[idx].sum(-1).max())
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None:
                value = value[idx]
                if value.dim() == 2:
                    value = value[:, : width if value.shape[1] == self.input_ids.shape[1] else width - 1]
            out[f.name] = value
        return GroupExperience(**out)

    def to(self, device: Any) -> GroupExperience:
        return GroupExperience(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).to(device)
                                  for f in fields(self)})


class GRPOModule(torch.nn.Module):
    """The policy and its frozen reference (a module, the LoRA policy with adapters off, or none at kl_coef 0)."""

    def __init__(self, policy: torch.nn.Module, ref: torch.nn.Module | None = None, ref_context: Any = None,
                 temperature: float = 1.0):
        super().__init__()
        self.policy, self.ref, self.ref_context, self.temperature = policy, ref, ref_context, temperature

    def train(self, mode: bool = True) -> GRPOModule:
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor
                ) -> dict[str, torch.Tensor]:
        """logps, entropy: (B, T - 1), zero outside response_mask[:, 1:]."""
        return completion_logprobs(self.policy, input_ids, attention_mask, response_mask, self.temperature,
                                   with_entropy=True)

    @torch.no_grad()
    def reference(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
        if self.ref is not None:
            return completion_logprobs(self.ref, input_ids, attention_mask, response_mask, self.temperature)["logps"]
        if self.ref_context is None:
            raise RuntimeError("no reference model (kl_coef is 0)")
        with self.ref_context():  # LoRA: the policy with its adapters off
            return completion_logprobs(self.policy, input_ids, attention_mask, response_mask, self.temperature)["logps"]


def grpo_step(model: torch.nn.Module, batch: GroupExperience, cliprange: float, cliprange_high: float | None,
              kl_coef: float, aggregation: str, max_new_tokens: int) -> tuple[torch.Tensor, Metrics]:
    """GRPO's clipped surrogate (+ kl_coef x k3 KL) on one minibatch of experience."""
    out = model(batch.input_ids, batch.attention_mask, batch.response_mask)  # (B, T-1) each
    mask = batch.response_mask[:, 1:]
    loss, metrics = grpo_policy_loss(out["logps"], batch.old_logps, batch.advantages, mask, cliprange, cliprange_high,
                                     batch.ref_logps if kl_coef > 0 else None, kl_coef, aggregation, max_new_tokens)
    return loss, {**metrics, "entropy": masked_mean(out["entropy"], mask)}


class GroupMaker:
    """The rollout hook: prompts -> G completions each -> rewards -> advantages -> the step's updates."""

    def __init__(self, config: Any, generator: Any, rewards: Any, tokenizer: Any):
        self.config, self.generator, self.rewards, self.tokenizer = config, generator, rewards, tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)
        self.calls = 0

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])

    def __call__(self, model: torch.nn.Module, batches: list) -> tuple[list, Metrics]:
        module = getattr(model, "module", model)  # DDP: generate and score on the plain module
        self.calls += 1
        module.eval()
        try:
            exp, metrics = self.make(module, [item for batch, _ in batches for item in batch.items])
        finally:
            module.train()
        minibatch = min(self.config.mini_batch_size, len(exp))
        updates = []
        for _ in range(self.config.num_iterations):
            order = torch.randperm(len(exp))  # the run's RNG: replayed exactly on resume
            for start in range(0, len(exp), minibatch):
                idx = order[start : start + minibatch]
                updates.append([(exp.select(idx), len(idx))])
        return updates, metrics

    @torch.no_grad()
    def make(self, module: torch.nn.Module, items: list) -> tuple[GroupExperience, Metrics]:
        device = next(module.parameters()).device
        g = self.config.group_size
        expanded = [item for item in items for _ in range(g)]  # (N,) = prompts x G, group after group
        self.generator.sync(module.policy)
        rollouts = self.generator.generate(module.policy, [item.ids for item in expanded])
        texts = [self._text(r.response) for r in rollouts]
        groups = [(item.messages, item.reference, texts[i * g : (i + 1) * g]) for i, item in enumerate(items)]
        total, parts = self.rewards.score(groups, self.calls)  # (N,) or RewardCallFailed
        ended = torch.tensor([r.ended for r in rollouts])  # (N,)
        rewards = total + self._penalties(rollouts, ended)  # (N,)
        advantages, adv_metrics = group_advantages(rewards, g, self.config.scale_rewards)  # (N,)

        rows = [item.ids + r.response for item, r in zip(expanded, rollouts)]
        masks = [[0] * len(item.ids) + [1] * len(r.response) for item, r in zip(expanded, rollouts)]
        input_ids, attention_mask = pad_right(rows, self.pad_id)  # (N, T)
        response_mask, _ = pad_right(masks, 0)  # (N, T)
        input_ids, attention_mask, response_mask = (t.to(device) for t in (input_ids, attention_mask, response_mask))
        logps, ref_logps = self._forward(module, input_ids, attention_mask, response_mask)  # (N, T-1) each

        mask = response_mask[:, 1:].float()
        metrics = {"reward_mean": rewards.mean(), "reward_std": rewards.std(unbiased=False), **adv_metrics,
                   "response_length": mask.sum(-1).mean().cpu(), "eos_fraction": ended.float().mean()}
        metrics |= {f"reward_{k}" if k != "prefix_tokens_saved" else "reward_prefix_tokens_saved": v.mean()
                    for k, v in parts.items()}
        if ref_logps is not None:
            metrics["kl_rollout"] = masked_mean(kl_estimate(logps, ref_logps, "k3"), mask).cpu()
        exp = GroupExperience(input_ids, attention_mask, response_mask, logps, advantages.to(device), ref_logps)
        return exp, metrics

    # --------------------------------------------------------------------------------------------- pieces

    def _text(self, response: list[int]) -> str:
        """The completion as rewards read it: special tokens (EOS) dropped."""
        return self.tokenizer.decode(response, skip_special_tokens=True).strip()

    def _penalties(self, rollouts: list, ended: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(len(rollouts))
        if self.config.missing_eos_penalty:
            out += missing_eos_penalty(ended, self.config.missing_eos_penalty)
        if self.config.overlong_cache:
            lengths = torch.tensor([len(r.response) for r in rollouts])
            out += overlong_penalty(lengths, self.config.max_new_tokens, self.config.overlong_cache)
        return out

    def _forward(self, module: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(policy log-probs, reference log-probs or None), (N, T-1) each, in chunks of mini_batch_size rows."""
        logps, refs = [], []
        for start in range(0, input_ids.shape[0], self.config.mini_batch_size):
            rows = slice(start, start + self.config.mini_batch_size)
            logps.append(module(input_ids[rows], attention_mask[rows], response_mask[rows])["logps"])
            if self.config.kl_coef > 0:
                refs.append(module.reference(input_ids[rows], attention_mask[rows], response_mask[rows]))
        return torch.cat(logps), torch.cat(refs) if refs else None
