"""Training losses as pure functions: tensors in, `(loss, metrics)` out; no model, no optimizer, no I/O.

Trainers only call these. Metrics are detached 0-dim float32 tensors (no device sync here: the loop decides
when to call `.item()`). Each loss cites the equation it implements.
"""

from __future__ import annotations

import math

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


# ------------------------------------------------------------------------------------- reference-free: SimPO, ORPO


def _pair_check(tensors: tuple[torch.Tensor, ...], what: str) -> None:
    first = tensors[0]
    if first.dim() != 1 or first.shape[0] == 0 or any(x.shape != first.shape for x in tensors):
        raise ValueError(f"{what}: log-probs and token counts must all have the same shape (B,), B >= 1; "
                         f"got {[tuple(x.shape) for x in tensors]}")


def _per_token(logps: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Summed completion log-probs -> their mean per token (an empty completion counts as one token)."""
    return logps.float() / tokens.float().clamp_min(1)


def _pair_metrics(reward_chosen: torch.Tensor, reward_rejected: torch.Tensor, logps_chosen: torch.Tensor,
                  logps_rejected: torch.Tensor) -> Metrics:
    reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
    return {
        "reward_chosen": reward_chosen.mean(), "reward_rejected": reward_rejected.mean(),
        "accuracy": (reward_chosen > reward_rejected).float().mean(),
        "margin": (reward_chosen - reward_rejected).mean(),
        "logps_chosen": logps_chosen.detach().float().mean(), "logps_rejected": logps_rejected.detach().float().mean(),
    }


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, Metrics]:
    """SimPO: DPO without a reference, on length-normalised log-probs, with a target reward margin.

    *_logps: (B,) summed completion log-probs under the policy; *_tokens: (B,) completion lengths |y|.
    With the implicit reward r(y) = beta / |y| * log pi(y | x) (Meng et al. 2024, arXiv:2405.14734, Eq. 4) and
    h = r(y_c) - r(y_r) - gamma, the per-pair loss is (Eq. 6)
        -(1 - e) log s(h) - e log s(-h)
    with e = label_smoothing (conservative, as for DPO; e = 0 is the paper's). The loss is the batch mean.

    Metrics (batch means): reward_chosen / reward_rejected (r), accuracy, margin, logps_chosen / logps_rejected
    (the length-normalised policy log-probs, as TRL's CPOTrainer logs them).
    """
    _pair_check((policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens), "SimPO")
    if beta <= 0 or gamma < 0 or not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"SimPO needs beta > 0, gamma >= 0, label_smoothing in [0, 0.5); got {beta}, {gamma}, "
                         f"{label_smoothing}")
    avg_chosen = _per_token(policy_chosen_logps, chosen_tokens)  # (B,)
    avg_rejected = _per_token(policy_rejected_logps, rejected_tokens)  # (B,)
    h = beta * (avg_chosen - avg_rejected) - gamma  # (B,)
    e = label_smoothing
    losses = -(1 - e) * F.logsigmoid(h) - e * F.logsigmoid(-h)
    with torch.no_grad():
        metrics = _pair_metrics(beta * avg_chosen, beta * avg_rejected, avg_chosen, avg_rejected)
    return losses.mean(), metrics


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate on both sides of -log 2 (Maechler 2012, "Accurately computing
    log(1 - exp(-|a|))", Eq. 7): log(-expm1(x)) near 0, log1p(-exp(x)) further out."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    chosen_tokens: torch.Tensor,
    rejected_tokens: torch.Tensor,
    lam: float = 0.1,
    nll: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """ORPO: supervised fine-tuning on the chosen completion plus an odds-ratio penalty; no reference model.

    *_logps: (B,) summed completion log-probs under the policy; *_tokens: (B,) completion lengths.
    With P(y | x) = exp(log pi(y | x) / |y|) (the per-token mean, Hong et al. 2024, arXiv:2403.07691, Eq. 1) and
    odds(y | x) = P / (1 - P), so log odds = log P - log(1 - P):
        L_OR  = -log s( log odds(y_c | x) - log odds(y_r | x) )                      Eq. 7
        L     = E[ L_SFT + lam * L_OR ]                                              Eq. 6
    where L_SFT (Eq. 2) is the chosen completion's mean per-token NLL, -log P(y_c | x), unless `nll` (a scalar)
    is given (e.g. TRL's, over prompt and completion tokens together).

    Metrics: nll, log_odds_ratio (mean log s(...)), log_odds_chosen (mean log-odds difference), reward_chosen /
    reward_rejected (lam x log P, as TRL logs them), accuracy, margin, logps_chosen / logps_rejected (log P).
    """
    _pair_check((policy_chosen_logps, policy_rejected_logps, chosen_tokens, rejected_tokens), "ORPO")
    if lam < 0:
        raise ValueError(f"ORPO's lambda must be >= 0, got {lam}")
    avg_chosen = _per_token(policy_chosen_logps, chosen_tokens)  # (B,) log P(y_c | x)
    avg_rejected = _per_token(policy_rejected_logps, rejected_tokens)  # (B,)
    log_odds = (avg_chosen - log1mexp(avg_chosen)) - (avg_rejected - log1mexp(avg_rejected))  # (B,)
    log_sigmoid = F.logsigmoid(log_odds)  # (B,)
    sft = -avg_chosen.mean() if nll is None else nll.float()
    loss = sft - lam * log_sigmoid.mean()
    with torch.no_grad():
        metrics = _pair_metrics(lam * avg_chosen, lam * avg_rejected, avg_chosen, avg_rejected)
        metrics |= {"nll": sft.detach(), "log_odds_ratio": log_sigmoid.detach().mean(),
                    "log_odds_chosen": log_odds.detach().mean()}
    return loss, metrics


# ------------------------------------------------------------------------------------------------------ KTO


def kto_reference_point(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z_0 = max(0, mean(log pi(y'|x) - log ref(y'|x))) over mismatched pairs (x, y') of the
    batch (Ethayarajh et al. 2024, arXiv:2402.01306, Sec. 4.1: a biased but convenient estimate of KL(pi || ref));
    no gradient flows through it. Inputs (B,) summed log-probs; output 0-dim."""
    return (policy_kl_logps.float() - ref_kl_logps.float()).mean().detach().clamp_min(0)


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, Metrics]:
    """KTO on B unpaired examples, each desirable or not (Ethayarajh et al. 2024, arXiv:2402.01306, Eq. 8).

    policy_logps, ref_logps: (B,) summed completion log-probs; desirable: (B,) bool; kl: z_0, a 0-dim tensor
    (`kto_reference_point`). With r = log pi(y|x) - log ref(y|x):
        desirable     lambda_D (1 - s(beta (r - z_0)))
        undesirable   lambda_U (1 - s(beta (z_0 - r)))
    and the loss is the mean over the B examples (lambda_D = desirable_weight, lambda_U = undesirable_weight).

    Metrics: kl (z_0); reward_chosen / logps_chosen over the desirable examples and reward_rejected /
    logps_rejected over the undesirable ones, each only when the batch has such examples (reward = beta r);
    margin when it has both.
    """
    _pair_check((policy_logps, ref_logps, desirable), "KTO")
    if beta <= 0 or desirable_weight < 0 or undesirable_weight < 0:
        raise ValueError(f"KTO needs beta > 0 and weights >= 0; got {beta}, {desirable_weight}, {undesirable_weight}")
    good = desirable.bool()  # (B,)
    ratio = policy_logps.float() - ref_logps.float()  # (B,) r
    z = kl.float().detach()
    losses = torch.where(good, desirable_weight * (1 - torch.sigmoid(beta * (ratio - z))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (z - ratio))))  # (B,)
    with torch.no_grad():
        rewards = beta * ratio.detach()
        metrics: Metrics = {"kl": z}
        for name, rows in (("chosen", good), ("rejected", ~good)):
            if rows.any():
                metrics[f"reward_{name}"] = rewards[rows].mean()
                metrics[f"logps_{name}"] = policy_logps.detach().float()[rows].mean()
        if good.any() and (~good).any():
            metrics["margin"] = metrics["reward_chosen"] - metrics["reward_rejected"]
    return losses.mean(), metrics
