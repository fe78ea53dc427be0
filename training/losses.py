"""Training losses as pure functions: tensors in, `(loss, metrics)` out; no model, no optimizer, no I/O.

Trainers only call these. Metrics are detached 0-dim float32 tensors (no device sync here: the loop decides
when to call `.item()`). Each loss cites the equation it implements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

Metrics = dict[str, torch.Tensor]


def _check_pair_shapes(chosen: torch.Tensor, rejected: torch.Tensor) -> None:
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(
            f"chosen and rejected rewards must both have shape (B,); got {tuple(chosen.shape)} "
            f"and {tuple(rejected.shape)}"
        )
    if chosen.shape[0] == 0:
        raise ValueError("empty batch: need at least one preference pair")


def _as_margin(margin: torch.Tensor | float | None, like: torch.Tensor) -> torch.Tensor | None:
    """The margin as a float32 tensor broadcastable to (B,), on the rewards' device."""
    if margin is None:
        return None
    m = torch.as_tensor(margin, dtype=torch.float32, device=like.device)
    if m.dim() > 1 or (m.dim() == 1 and m.shape != like.shape):
        raise ValueError(f"margin must be a scalar or have shape {tuple(like.shape)}; got {tuple(m.shape)}")
    return m


def bradley_terry_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    margin: torch.Tensor | float | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Pairwise reward-model loss on one batch of B preference pairs.

    chosen_rewards, rejected_rewards: (B,) raw reward logits (e.g. `reward_forward(...).chunk(2)`).
    margin: None, a float, or (B,) per-pair margins m; the pair must then win by at least m.
    center_rewards_coefficient: None (off) or lambda for the centering penalty.

    Returns the scalar loss and metrics:
      accuracy         fraction of pairs with r_c > r_r (strict: a tie counts as wrong)
      ties             fraction of pairs with r_c == r_r
      reward_chosen    mean r_c
      reward_rejected  mean r_r
      margin           mean (r_c - r_r)  (the reward gap, not the margin argument; named as in TRL)
      center_penalty   mean (r_c + r_r)^2, only when centering is on
    """
    _check_pair_shapes(chosen_rewards, rejected_rewards)
    r_c = chosen_rewards.float()  # (B,)
    r_r = rejected_rewards.float()  # (B,)
    m = _as_margin(margin, r_c)  # (B,) | () | None
    gap = r_c - r_r  # (B,)

    # Bradley-Terry: loss = -E[log sigma(r_c - r_r)]  (Ouyang et al. 2022, InstructGPT, Eq. 1);
    # with a margin m: -E[log sigma(r_c - r_r - m)]  (Touvron et al. 2023, Llama 2, Eq. 2).
    logits = gap if m is None else gap - m  # (B,)
    loss = -F.logsigmoid(logits).mean()

    center = None
    if center_rewards_coefficient is not None:
        # Centering: + lambda * E[(r_c + r_r)^2] pushes rewards toward mean zero
        # (Eisenstein et al. 2023, "Helping or Herding?", arXiv:2312.09244, Eq. 2; as TRL's RewardTrainer).
        center = torch.mean((r_c + r_r) ** 2)
        loss = loss + center_rewards_coefficient * center

    with torch.no_grad():
        metrics: Metrics = {
            "accuracy": (r_c > r_r).float().mean(),
            "ties": (r_c == r_r).float().mean(),
            "reward_chosen": r_c.mean().detach(),
            "reward_rejected": r_r.mean().detach(),
            "margin": gap.mean().detach(),
        }
        if center is not None:
            metrics["center_penalty"] = center.detach()
    return loss, metrics
