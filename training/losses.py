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


# ------------------------------------------------------------------------------------------------------ DPO

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def _dpo_check(logps: tuple[torch.Tensor, ...], beta: float, loss_type: str, label_smoothing: float) -> None:
    first = logps[0]
    if first.dim() != 1 or first.shape[0] == 0 or any(x.shape != first.shape for x in logps):
        raise ValueError(f"DPO log-probs must all have the same shape (B,), B >= 1; got {[tuple(x.shape) for x in logps]}")
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use one of {DPO_LOSS_TYPES}")
    if loss_type in ("ipo", "hinge") and label_smoothing:
        raise ValueError(f"label_smoothing does not apply to the {loss_type} loss (use sigmoid or robust)")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {label_smoothing}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """Direct preference optimization on B pairs of completions.

    *_logps: (B,) summed log-probs of each completion (prompt tokens excluded) under the policy / the reference.
    chosen_tokens, rejected_tokens: (B,) completion lengths; used by `ipo` only (see there).

    With h = (log pi(y_c) - log ref(y_c)) - (log pi(y_r) - log ref(y_r)), the per-pair losses are
      sigmoid  -(1 - e) log s(beta h) - e log s(-beta h)     Rafailov et al. 2023, arXiv:2305.18290, Eq. 7; e > 0 is
                                                             conservative DPO (Mitchell 2023, "A note on DPO with
                                                             noisy preferences")
      robust   (-(1 - e) log s(beta h) + e log s(-beta h)) / (1 - 2e)   Chowdhury et al. 2024, arXiv:2403.00409, Eq. 8
      hinge    max(0, 1 - beta h)                            SLiC-HF, Zhao et al. 2023, arXiv:2305.10425, Eq. 2
      ipo      (h - 1 / (2 beta))^2                          Azar et al. 2023, arXiv:2310.12036, Eq. 17; when the
                                                             lengths are given each log-ratio is first divided by
                                                             its completion length (TRL's per-token normalization)
    where e = label_smoothing (the assumed share of flipped labels, in [0, 0.5)); the loss is the batch mean.

    Metrics (means over the batch): reward_chosen / reward_rejected = beta * log-ratio (the implicit rewards),
    accuracy (strict: reward_chosen > reward_rejected), margin (reward_chosen - reward_rejected),
    logps_chosen / logps_rejected (policy).
    """
    _dpo_check((policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps), beta, loss_type,
               label_smoothing)
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()  # (B,)
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()  # (B,)
    h = chosen_ratio - rejected_ratio  # (B,)
    e = label_smoothing
    if loss_type == "sigmoid":
        losses = -(1 - e) * F.logsigmoid(beta * h) - e * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1 - e) * F.logsigmoid(beta * h) + e * F.logsigmoid(-beta * h)) / (1 - 2 * e)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * h)
    else:  # ipo
        if (chosen_tokens is None) != (rejected_tokens is None):
            raise ValueError("ipo: pass both chosen_tokens and rejected_tokens, or neither")
        if chosen_tokens is not None:
            h = chosen_ratio / chosen_tokens.float().clamp_min(1) - rejected_ratio / rejected_tokens.float().clamp_min(1)
        losses = (h - 1 / (2 * beta)) ** 2

    with torch.no_grad():
        reward_chosen, reward_rejected = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
        metrics: Metrics = {
            "reward_chosen": reward_chosen.mean(),
            "reward_rejected": reward_rejected.mean(),
            "accuracy": (reward_chosen > reward_rejected).float().mean(),
            "margin": (reward_chosen - reward_rejected).mean(),
            "logps_chosen": policy_chosen_logps.detach().float().mean(),
            "logps_rejected": policy_rejected_logps.detach().float().mean(),
        }
    return losses.mean(), metrics
