"""GRPO's math as pure functions on tensors: group-relative advantages, the clipped surrogate with its averaging
choices and the k3 KL penalty, and the length penalties. No model, no optimizer, no I/O; metrics are detached
0-dim tensors. Checked against TRL 1.16's GRPOTrainer in tests/unit/test_grpo_math.py.

Shapes: N = prompts x G completions, laid out group after group ([p0 c0, p0 c1, ..., p0 c{G-1}, p1 c0, ...]);
per-token tensors are (N, T), aligned with the completion tokens and zero outside `mask`.
"""

from __future__ import annotations

import torch

from training.rl_math import kl_estimate

Metrics = dict[str, torch.Tensor]
SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token", "sequence", "constant")


def _unbiased_std(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    return x.std(dim=dim, unbiased=True) if dim is not None else x.std(unbiased=True)


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
                     ) -> tuple[torch.Tensor, Metrics]:
    """Group-relative advantages of N = P x G completions (one scalar per completion, broadcast over its tokens).

        A_i = (r_i - mean(r_group))                          scale "none": Dr. GRPO (Liu et al. 2025,
                                                             arXiv:2503.20783, Sec. 3.2: no std division)
        A_i = (r_i - mean(r_group)) / (std(r_group) + eps)   scale "group": GRPO (Shao et al. 2024, DeepSeekMath,
                                                             arXiv:2402.03300, Sec. 4.1.2, outcome supervision)
        A_i = (r_i - mean(r_group)) / (std(r_batch) + eps)   scale "batch": the std of all N rewards
    std is the sample (unbiased) standard deviation, as in TRL. A group whose rewards are all equal carries no
    signal: its advantages are exactly 0 in every scale (no NaN, no rounding residue), and it is counted.

    rewards: (N,) float; N a multiple of group_size >= 2. Returns (advantages (N,), metrics): zero_std_groups
    (count), zero_std_fraction, group_reward_std (mean within-group std).
    """
    if scale not in SCALES:
        raise ValueError(f"unknown advantage scale {scale!r}; use one of {SCALES}")
    if group_size < 2 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ValueError(f"need (N,) rewards with N a multiple of group_size >= 2; got {tuple(rewards.shape)}, "
                         f"group_size {group_size}")
    grouped = rewards.float().view(-1, group_size)  # (P, G)
    advantages = grouped - grouped.mean(dim=1, keepdim=True)  # (P, G)
    group_std = _unbiased_std(grouped, dim=1)  # (P,)
    if scale == "group":
        advantages = advantages / (group_std.unsqueeze(1) + eps)
    elif scale == "batch":
        advantages = advantages / (_unbiased_std(grouped.flatten()) + eps)
    flat = (grouped == grouped[:, :1]).all(dim=1)  # (P,) every reward equals the first
    advantages = advantages.masked_fill(flat.unsqueeze(1), 0.0)
    metrics = {"zero_std_groups": flat.sum().float(), "zero_std_fraction": flat.float().mean(),
               "group_reward_std": group_std.mean()}
    return advantages.flatten(), metrics


def grpo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    cliprange: float = 0.2,
    cliprange_high: float | None = None,
    ref_logps: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    aggregation: str = "token",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """GRPO's clipped surrogate with a per-token KL penalty, as a loss (Shao et al. 2024, arXiv:2402.03300, Eq. 3):

        l_t = -min(rho_t A, clip(rho_t, 1 - eps_low, 1 + eps_high) A) + beta * KL_t,   rho_t = pi / pi_old per token
        KL_t = ref/pi - log(ref/pi) - 1                     the k3 estimator (Eq. 4; rl_math.kl_estimate "k3")

    eps_high = cliprange_high or cliprange (DAPO's "clip higher" when larger). Aggregation over the (N, T) tokens:
        "sequence"  mean over each completion's tokens, then over completions (the paper's 1/G sum_i 1/|o_i| sum_t)
        "token"     mean over all tokens of the batch (DAPO, Yu et al. 2025, arXiv:2503.14476, Eq. 8; no length bias)
        "constant"  sum over all tokens / (N x max_completion_length) (Dr. GRPO, arXiv:2503.20783, Sec. 3.2)

    logps, old_logps, mask: (N, T); advantages: (N,); ref_logps: (N, T), needed only when kl_coef > 0 (with 0 the
    reference is never read). Metrics: clip_ratio_low / clip_ratio_high / clip_ratio (token shares clipped below,
    above, either, where it matters for the sign of A, as TRL counts), ratio (mean rho), kl (mean KL_t, when
    computed), policy_loss (the surrogate alone).
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {aggregation!r}; use one of {AGGREGATIONS}")
    if aggregation == "constant" and not max_completion_length:
        raise ValueError("aggregation 'constant' needs max_completion_length")
    if kl_coef < 0 or (kl_coef > 0 and ref_logps is None):
        raise ValueError("kl_coef must be >= 0, and > 0 needs ref_logps")
    eps_low, eps_high = cliprange, cliprange if cliprange_high is None else cliprange_high
    m = mask.to(logps.dtype)  # (N, T)
    adv = advantages.to(logps.dtype).unsqueeze(1)  # (N, 1)
    ratio = torch.exp(logps - old_logps)  # (N, T)
    surrogate = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv)  # (N, T)
    per_token = surrogate
    kl = None
    if kl_coef > 0:
        kl = kl_estimate(logps, ref_logps, "k3")  # (N, T)
        per_token = surrogate + kl_coef * kl

    def aggregate(x: torch.Tensor) -> torch.Tensor:
        if aggregation == "sequence":
            return ((x * m).sum(-1) / m.sum(-1).clamp_min(1)).mean()
        if aggregation == "token":
            return (x * m).sum() / m.sum().clamp_min(1)
        return (x * m).sum() / (x.shape[0] * max_completion_length)

    loss = aggregate(per_token)
    with torch.no_grad():
        tokens = m.sum().clamp_min(1)
        token_mean = lambda x: (x.float() * m).sum() / tokens  # noqa: E731
        low = (ratio < 1 - eps_low) & (adv < 0)
        high = (ratio > 1 + eps_high) & (adv > 0)
        metrics = {"clip_ratio_low": token_mean(low), "clip_ratio_high": token_mean(high),
                   "clip_ratio": token_mean(low | high), "ratio": token_mean(ratio),
                   "policy_loss": aggregate(surrogate).detach()}
        if kl is not None:
            metrics["kl"] = token_mean(kl)
    return loss, metrics


# ----------------------------------------------------------------------------------------------- penalties


def overlong_penalty(lengths: torch.Tensor, max_length: int, cache: int) -> torch.Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, arXiv:2503.14476, Eq. 13), per completion:
        0                              |y| <= L_max - L_cache
        ((L_max - L_cache) - |y|) / L_cache    L_max - L_cache < |y| <= L_max
        -1                             |y| > L_max
    lengths: (N,) token counts -> (N,) float32 penalties in [-1, 0]."""
    if cache < 1 or cache > max_length:
        raise ValueError(f"need 1 <= cache <= max_length; got cache {cache}, max_length {max_length}")
    lengths = lengths.float()
    start = max_length - cache
    ramp = (start - lengths) / cache
    return torch.where(lengths <= start, torch.zeros_like(ramp), torch.where(lengths <= max_length, ramp, -torch.ones_like(ramp)))


def missing_eos_penalty(ended: torch.Tensor, penalty: float) -> torch.Tensor:
    """-penalty for each completion cut at the length limit without its EOS, 0 for the others: (N,) bool -> (N,)."""
    return torch.where(ended.bool(), 0.0, -float(penalty)).float()
