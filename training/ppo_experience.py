"""PPO's experience: rollouts -> scores -> per-token rewards -> advantages, and the PPO step on a minibatch of it.

`ExperienceMaker` is the loop's rollout hook (see training.loop.train): it receives one step's prompt micro-batches
and returns the step's optimizer updates. It also carries the state a resume needs beyond the weights: the KL
coefficient and the running reward statistics (`state_dict` / `load_state_dict`, saved in every checkpoint).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any

import torch

from training.data import pad_right
from training.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_value_loss,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
)

log = logging.getLogger("rewardserve.train.ppo")
Metrics = dict[str, torch.Tensor]


@dataclass
class Experience:
    """N rollouts as right-padded rows prompt + response. Per-token tensors are (N, T - 1), aligned with the
    labels input_ids[:, 1:] and zero outside response_mask[:, 1:]."""

    input_ids: torch.Tensor  # (N, T)
    attention_mask: torch.Tensor  # (N, T)
    response_mask: torch.Tensor  # (N, T): 1 on response tokens
    old_logps: torch.Tensor  # (N, T-1) policy log-probs at rollout time
    old_values: torch.Tensor  # (N, T-1) value head at rollout time
    advantages: torch.Tensor  # (N, T-1)
    returns: torch.Tensor  # (N, T-1)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, idx: torch.Tensor) -> Experience:
        """Rows idx, trimmed to their longest row."""
        width = int(self.attention_mask[idx].sum(-1).max())
        parts = {f.name: getattr(self, f.name)[idx] for f in fields(self)}
        return Experience(**{k: v[:, : width if v.shape[1] == self.input_ids.shape[1] else width - 1]
                             for k, v in parts.items()})

    def to(self, device: Any) -> Experience:
        return Experience(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def ppo_step(model: torch.nn.Module, batch: Experience, cliprange: float, cliprange_value: float, vf_coef: float
             ) -> tuple[torch.Tensor, Metrics]:
    """Clipped policy loss + vf_coef x clipped value loss on one minibatch of experience."""
    out = model(batch.input_ids, batch.attention_mask, batch.response_mask)  # (B, T-1) each
    mask = batch.response_mask[:, 1:]
    pg_loss, pg = ppo_policy_loss(out["logps"], batch.old_logps, batch.advantages, mask, cliprange)
    vf_loss, vf = clipped_value_loss(out["values"], batch.old_values, batch.returns, mask, cliprange_value)
    metrics = {"policy_loss": pg_loss.detach(), "value_loss": vf_loss.detach(), "entropy": masked_mean(out["entropy"], mask),
               **pg, **vf}
    return pg_loss + vf_coef * vf_loss, metrics


def _all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        x = x.clone()
        torch.distributed.all_reduce(x)
        x /= torch.distributed.get_world_size()
    return x


class ExperienceMaker:
    """The rollout hook: prompts -> experience -> ppo_epochs x minibatch updates; plus the KL controller."""

    def __init__(self, config: Any, generator: Any, scorer: Any, tokenizer: Any):
        self.config, self.generator, self.scorer, self.tokenizer = config, generator, scorer, tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = 0 if pad is None else int(pad)
        self.kl = (AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.adaptive_kl
                   else FixedKLController(config.kl_coef))
        self.moments = RunningMoments()
        self.calls = 0

    def state_dict(self) -> dict:
        return {"kl": self.kl.state_dict(), "moments": self.moments.state_dict(), "calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.kl.load_state_dict(state["kl"])
        self.moments.load_state_dict(state["moments"])
        self.calls = int(state["calls"])

    # ------------------------------------------------------------------------------------------ the hook

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
        for _ in range(self.config.ppo_epochs):
            order = torch.randperm(len(exp))  # the run's RNG: replayed exactly on resume
            for start in range(0, len(exp), minibatch):  # every process has as many rollouts: DDP steps together
                idx = order[start : start + minibatch]
                updates.append([(exp.select(idx), len(idx))])
        return updates, metrics

    @torch.no_grad()
    def make(self, module: torch.nn.Module, items: list) -> tuple[Experience, Metrics]:
        device = next(module.parameters()).device
        self.generator.sync(module.policy)
        rollouts = self.generator.generate(module.policy, [item.ids for item in items])
        inputs = [{"messages": [*item.messages, {"role": "assistant", "content": self._text(r.response)}]}
                  for item, r in zip(items, rollouts)]
        raw = torch.tensor(self.scorer.score(inputs, self.calls), dtype=torch.float32)  # (N,) or RewardCallFailed
        ended = torch.tensor([r.ended for r in rollouts])  # (N,)
        scores = self._shape_scores(raw, ended)

        rows = [item.ids + r.response for item, r in zip(items, rollouts)]
        masks = [[0] * len(item.ids) + [1] * len(r.response) for item, r in zip(items, rollouts)]
        input_ids, attention_mask = pad_right(rows, self.pad_id)  # (N, T)
        response_mask, _ = pad_right(masks, 0)  # (N, T)
        input_ids, attention_mask, response_mask = (t.to(device) for t in (input_ids, attention_mask, response_mask))
        logps, values, ref_logps = self._forward(module, input_ids, attention_mask, response_mask)
        mask = response_mask[:, 1:].float()  # (N, T-1)

        kl = kl_estimate(logps, ref_logps, self.config.kl_estimator) * mask  # (N, T-1)
        rewards = -self.kl.value * kl  # (N, T-1)
        last = mask.sum(-1).long() + response_mask.argmax(-1) - 2  # (N,) column of each row's last response label
        rewards[torch.arange(len(rows)), last] += scores.to(device)
        advantages, returns = gae(rewards, values, mask, self.config.gamma, self.config.lam)
        if self.config.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask

        seq_kl = _all_reduce_mean(kl.sum(-1).mean())
        metrics = {
            "reward_mean": raw.mean(), "reward_std": raw.std(unbiased=False), "score_mean": scores.mean(),
            "kl": seq_kl.cpu(), "kl_coef": torch.tensor(self.kl.value),
            "non_score_reward": (-self.kl.value * kl.sum(-1)).mean().cpu(),
            "response_length": mask.sum(-1).mean().cpu(), "eos_fraction": ended.float().mean(),
            "explained_variance": explained_variance(values, returns, mask).cpu(),
        }
        if all(r.logps is not None and len(r.logps) == len(r.response) for r in rollouts):  # vLLM: is it in sync?
            metrics["generator_logprob_gap"] = self._logprob_gap(rollouts, items, logps).cpu()
        self.kl.update(float(seq_kl), len(rows) * _world())
        return Experience(input_ids, attention_mask, response_mask, logps, values, advantages, returns), metrics

    # --------------------------------------------------------------------------------------------- pieces

    def _text(self, response: list[int]) -> str:
        """The response as the reward model reads it: special tokens (EOS) dropped."""
        return self.tokenizer.decode(response, skip_special_tokens=True).strip()

    @staticmethod
    def _logprob_gap(rollouts: list, items: list, logps: torch.Tensor) -> torch.Tensor:
        """Mean |generator log-prob - policy log-prob| over the response tokens: ~0 when the generator holds the
        policy's current weights (larger: stale weights, or numerics)."""
        gaps = [torch.tensor(r.logps) - logps[i, len(item.ids) - 1 : len(item.ids) - 1 + len(r.response)].cpu()
                for i, (item, r) in enumerate(zip(items, rollouts))]
        return torch.cat(gaps).abs().mean()

    def _shape_scores(self, raw: torch.Tensor, ended: torch.Tensor) -> torch.Tensor:
        """raw scores -> running normalization -> missing-EOS penalty -> clipping."""
        scores = raw.clone()
        if self.config.normalize_rewards:
            self.moments.update(_gather(raw))
            scores = self.moments.normalize(scores)
        if self.config.missing_eos_penalty is not None:
            scores = torch.where(ended, scores, scores - self.config.missing_eos_penalty)
        if self.config.reward_clip is not None:
            scores = scores.clamp(-self.config.reward_clip, self.config.reward_clip)
        return scores

    def _forward(self, module: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(policy log-probs, values, reference log-probs), (N, T-1) each, in chunks of mini_batch_size rows."""
        parts: list[tuple[torch.Tensor, ...]] = []
        for start in range(0, input_ids.shape[0], self.config.mini_batch_size):
            rows = slice(start, start + self.config.mini_batch_size)
            out = module(input_ids[rows], attention_mask[rows], response_mask[rows])
            ref = module.reference(input_ids[rows], attention_mask[rows], response_mask[rows])
            parts.append((out["logps"], out["values"], ref))
        return tuple(torch.cat(p) for p in zip(*parts))  # type: ignore[return-value]


def _world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _gather(x: torch.Tensor) -> torch.Tensor:
    """Every process's values (the reward statistics stay identical across processes)."""
    if _world() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world())]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts)
