"""RL math for PPO on token sequences, as pure functions: tensors in, tensors (or `(loss, metrics)`) out.

Conventions: per-token tensors are (B, T) and come with a 0/1 `mask` (B, T) marking the tokens that count (the
response tokens of each row; each row's response is one contiguous run). Nothing here touches a model, an optimizer
or a file; the two KL controllers and `RunningMoments` carry a little state and can `state_dict()` it (plain JSON).
"""

from __future__ import annotations

import math

import torch

Metrics = dict[str, torch.Tensor]
KL_ESTIMATORS = ("k1", "k2", "k3")


# ------------------------------------------------------------------------------------------ log-probs


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[label] per position: logits (..., V), labels (...) -> (...) float32.

    Computed as logit[label] - logsumexp(logits) so that no (..., V) log-softmax tensor is kept for backward.
    """
    logits = logits.float()
    picked = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)  # (...)
    return picked - torch.logsumexp(logits, dim=-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) per position: (..., V) -> (...); H = logsumexp(z) - sum_v p_v z_v."""
    logits = logits.float()
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


def sequence_logprobs(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log pi(y | x) = sum over the masked tokens: (B, T), (B, T) -> (B,)."""
    return (token_logps * mask).sum(-1)


# ----------------------------------------------------------------------------------- masked statistics


def _mask_like(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from values shape {tuple(values.shape)}")
    return mask.to(values.dtype)


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of the masked entries (all of them, or along `dim`)."""
    m = _mask_like(values, mask)
    if dim is None:
        count = m.sum()
        if count == 0:
            raise ValueError("masked_mean: the mask selects nothing")
        return (values * m).sum() / count
    return (values * m).sum(dim) / m.sum(dim)


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries; unbiased: Bessel's n / (n - 1) correction (needs n >= 2)."""
    m = _mask_like(values, mask)
    count = m.sum()
    if count < (2 if unbiased else 1):
        raise ValueError(f"masked_var: the mask selects {int(count)} values; the unbiased variance needs 2")
    mean = (values * m).sum() / count
    var = (((values - mean) ** 2) * m).sum() / count
    return var * count / (count - 1) if unbiased else var


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(values - mean) / sqrt(var + eps) with the masked mean and unbiased variance; shift_mean=False adds the
    mean back (rescale only: used for rewards, whose sign matters)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    out = (values - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[returns - values] / Var[returns] over the masked tokens (1: perfect critic, <= 0: no better than
    a constant; 0 when the returns are constant)."""
    var_returns = masked_var(returns, mask, unbiased=False)
    if var_returns <= 1e-12:  # constant returns: nothing to explain
        return torch.zeros((), dtype=values.dtype, device=values.device)
    return 1 - masked_var(returns - values, mask, unbiased=False) / var_returns


# ------------------------------------------------------------------------------------------------- KL


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (J. Schulman, "Approximating KL
    Divergence", 2020): with log r = ref_logp - logp,
        k1 = -log r             unbiased, high variance, can be negative
        k2 = (log r)^2 / 2      biased, low variance
        k3 = (r - 1) - log r    unbiased, low variance, never negative
    """
    log_r = ref_logp - logp
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r**2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise ValueError(f"unknown KL estimator {kind!r}; use one of {KL_ESTIMATORS}")


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, value: float):
        self.value = float(value)

    def update(self, current: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", Sec. 2.2:
        e_t = clip(KL_t / KL_target - 1, -0.2, 0.2);   beta_{t+1} = beta_t (1 + K_beta e_t),  K_beta = n_steps / horizon
    """

    def __init__(self, init_value: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs target > 0 and horizon > 0")
        super().__init__(init_value)
        self.target, self.horizon = float(target), float(horizon)

    def update(self, current: float, n_steps: int) -> None:
        error = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon


# ---------------------------------------------------------------------------------------- advantages


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, arXiv:1506.02438, Eq. 16) along each row:
        delta_t = r_t + gamma V_{t+1} - V_t,     A_t = delta_t + gamma lam A_{t+1}
    rewards, values, mask: (B, T). Rewards and values outside the mask count as 0, so the value after a row's last
    response token is 0 (the episode ends there). Returns (advantages, returns = advantages + values), (B, T) each,
    both zero outside the mask.
    """
    m = _mask_like(values, mask)
    values, rewards = values * m, rewards * m
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)  # V_{t+1}, (B, T)
    deltas = rewards + gamma * next_values - values  # (B, T)
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])  # A_{t+1}, (B,)
    for t in range(values.shape[1] - 1, -1, -1):
        running = deltas[:, t] + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * m
    return advantages, (advantages + values) * m


# ---------------------------------------------------------------------------------------------- losses


def ppo_policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                    cliprange: float = 0.2) -> tuple[torch.Tensor, Metrics]:
    """PPO's clipped surrogate (Schulman et al. 2017, arXiv:1707.06347, Eq. 7), as a loss, per token:
        L = E_t[ max(-A_t rho_t, -A_t clip(rho_t, 1 - eps, 1 + eps)) ],   rho_t = pi(a_t|s_t) / pi_old(a_t|s_t)
    averaged over the masked tokens. Metrics: clipfrac (share of tokens where the clipped term is the larger),
    approx_kl = E[(log rho)^2] / 2, ratio (mean rho).
    """
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        metrics = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": masked_mean(0.5 * log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, metrics


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       cliprange_value: float = 0.2) -> tuple[torch.Tensor, Metrics]:
    """Clipped value loss (as in OpenAI baselines' ppo2 and Ziegler et al. 2019's lm-human-preferences):
        L_V = 1/2 E_t[ max((V_t - R_t)^2, (clip(V_t, V_old - eps, V_old + eps) - R_t)^2) ]
    Metrics: vf_clipfrac (share of tokens where the clipped error is the larger)."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    err, err_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    with torch.no_grad():
        metrics = {"vf_clipfrac": masked_mean((err_clipped > err).float(), mask)}
    return loss, metrics


# ----------------------------------------------------------------------------------- reward statistics


class RunningMoments:
    """Running mean and (population) std of every value seen, merged batch by batch (Chan et al. 1979)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, xs: torch.Tensor) -> None:
        xs = xs.detach().double().flatten()
        n = xs.numel()
        if n == 0:
            return
        batch_mean = float(xs.mean())
        batch_m2 = float(((xs - batch_mean) ** 2).sum())
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count else 1.0

    def normalize(self, xs: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
        return (xs - self.mean) / (self.std + eps)

    def state_dict(self) -> dict:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])
