"""training.rl_math: hand-computed values, and parity with TRL's legacy PPO math.

TRL 1.16 no longer ships its legacy PPO helpers (no AdaptiveKLController, compute_advantages or masked_whiten in
the installed package, trl.experimental included), so the references below are transcriptions of TRL v0.11.4:
`masked_mean`, `masked_var`, `masked_whiten` from trl/core.py; `AdaptiveKLController` from trl/trainer/utils.py;
`PPOTrainer.compute_advantages` from trl/trainer/ppo_trainer.py (huggingface/trl, Apache-2.0). They are test
oracles only.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.rl_math import (
    AdaptiveKLController,
    FixedKLController,
    RunningMoments,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_estimate,
    masked_mean,
    masked_var,
    masked_whiten,
    ppo_policy_loss,
    sequence_logprobs,
    token_logprobs,
)

# ------------------------------------------------------------------------- TRL v0.11.4, transcribed (oracles)


def trl_masked_mean(values, mask, axis=None):
    if axis is not None:
        return (values * mask).sum(axis=axis) / mask.sum(axis=axis)
    return (values * mask).sum() / mask.sum()


def trl_masked_var(values, mask, unbiased=True):
    mean = trl_masked_mean(values, mask)
    centered_values = values - mean
    variance = trl_masked_mean(centered_values**2, mask)
    if unbiased:
        mask_sum = mask.sum()
        bessel_correction = mask_sum / (mask_sum - 1)
        variance = variance * bessel_correction
    return variance


def trl_masked_whiten(values, mask, shift_mean=True):
    mean, var = trl_masked_mean(values, mask), trl_masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened += mean
    return whitened


class TrlAdaptiveKLController:
    def __init__(self, init_kl_coef, target, horizon):
        self.value = init_kl_coef
        self.target = target
        self.horizon = horizon

    def update(self, current, n_steps):
        target = self.target
        proportional_error = np.clip(current / target - 1, -0.2, 0.2)
        mult = 1 + proportional_error * n_steps / self.horizon
        self.value *= mult


def trl_compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards=False):
    lastgaelam = 0
    advantages_reversed = []
    gen_len = rewards.shape[-1]
    values = values * mask
    rewards = rewards * mask
    if whiten_rewards:
        rewards = trl_masked_whiten(rewards, mask, shift_mean=False)
    for t in reversed(range(gen_len)):
        nextvalues = values[:, t + 1] if t < gen_len - 1 else 0.0
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam = delta + gamma * lam * lastgaelam
        advantages_reversed.append(lastgaelam)
    advantages = torch.stack(advantages_reversed[::-1]).transpose(0, 1)
    returns = advantages + values
    advantages = trl_masked_whiten(advantages, mask)
    return values, advantages.detach(), returns


# ------------------------------------------------------------------------------------------------ fixtures


def rows(seed: int, b: int = 5, t: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(values, rewards, mask): each row's mask is one contiguous run (a response after its prompt)."""
    g = torch.Generator().manual_seed(seed)
    values, rewards = torch.randn(b, t, generator=g), torch.randn(b, t, generator=g)
    mask = torch.zeros(b, t)
    for i in range(b):
        start = int(torch.randint(0, t // 2, (1,), generator=g))
        end = int(torch.randint(start + 1, t + 1, (1,), generator=g))
        mask[i, start:end] = 1
    return values, rewards, mask


# --------------------------------------------------------------------------------------- parity with TRL


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masked_statistics_match_trl(seed):
    values, _, mask = rows(seed)
    torch.testing.assert_close(masked_mean(values, mask), trl_masked_mean(values, mask))
    torch.testing.assert_close(masked_mean(values, mask, dim=1), trl_masked_mean(values, mask, axis=1))
    torch.testing.assert_close(masked_var(values, mask), trl_masked_var(values, mask))
    torch.testing.assert_close(masked_var(values, mask, unbiased=False), trl_masked_var(values, mask, unbiased=False))
    for shift in (True, False):
        torch.testing.assert_close(masked_whiten(values, mask, shift), trl_masked_whiten(values, mask, shift))


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("seed", [0, 3])
def test_gae_matches_trl_compute_advantages(seed, gamma, lam):
    values, rewards, mask = rows(seed)
    _, want_adv, want_returns = trl_compute_advantages(values, rewards, mask, gamma, lam)
    adv, returns = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(returns * mask, want_returns * mask, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(masked_whiten(adv, mask) * mask, want_adv * mask, atol=1e-5, rtol=1e-5)
    # Differs on purpose: TRL's whiten_rewards=True whitens after masking and does not mask again, so padding
    # positions after a response get nonzero rewards that flow back into the response's advantages. gae() masks
    # its inputs, so whitened rewards leak nothing: the padding after a row changes no advantage.
    whitened = masked_whiten(rewards * mask, mask, shift_mean=False)
    leaked, _ = gae(whitened, values, mask, gamma, lam)
    adv_masked, _ = gae(whitened * mask, values, mask, gamma, lam)
    torch.testing.assert_close(leaked, adv_masked)
    if lam > 0:
        _, trl_leaky, _ = trl_compute_advantages(values, rewards, mask, gamma, lam, whiten_rewards=True)
        assert not torch.allclose(masked_whiten(leaked, mask) * mask, trl_leaky * mask, atol=1e-4)


def test_adaptive_kl_controller_matches_trl():
    ours, theirs = AdaptiveKLController(0.2, target=6.0, horizon=10000), TrlAdaptiveKLController(0.2, 6.0, 10000)
    for current, n_steps in [(1.0, 64), (6.0, 64), (12.0, 64), (20.0, 128), (5.9, 32), (0.0, 256)]:
        ours.update(current, n_steps)
        theirs.update(current, n_steps)
        assert ours.value == pytest.approx(float(theirs.value), rel=1e-12)
    restored = AdaptiveKLController(1.0, 6.0, 10000)
    restored.load_state_dict(ours.state_dict())
    assert restored.value == ours.value
    fixed = FixedKLController(0.05)
    fixed.update(100.0, 64)
    assert fixed.value == 0.05


# ------------------------------------------------------------------------------------------ hand-computed


def test_gae_by_hand():
    # one row: prompt token (masked), 3 response tokens, padding; gamma = 0.5, lam = 0.5
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 7.0]])
    values = torch.tensor([[5.0, 1.0, 2.0, 3.0, 8.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0]])
    adv, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    d3 = 1.0 + 0.5 * 0 - 3.0  # the value after the last response token is 0: -2
    d2 = 0.0 + 0.5 * 3.0 - 2.0  # -0.5
    d1 = 0.0 + 0.5 * 2.0 - 1.0  # 0
    a3, a2 = d3, d2 + 0.25 * d3
    a1 = d1 + 0.25 * a2
    torch.testing.assert_close(adv, torch.tensor([[0.0, a1, a2, a3, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[0.0, a1 + 1, a2 + 2, a3 + 3, 0.0]]))


def test_kl_estimators_by_hand():
    logp, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k1"), torch.tensor([0.5, -1.0]))
    torch.testing.assert_close(kl_estimate(logp, ref, "k2"), torch.tensor([0.125, 0.5]))
    want_k3 = torch.tensor([math.exp(-0.5) - 1 + 0.5, math.exp(1.0) - 1 - 1.0])
    torch.testing.assert_close(kl_estimate(logp, ref, "k3"), want_k3)
    assert (kl_estimate(torch.randn(100), torch.randn(100), "k3") >= 0).all()
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_estimate(logp, ref, "k4")


def test_kl_estimators_are_unbiased_on_samples():
    """k1 and k3 average to KL(p || q) over samples from p; checked on a 4-way categorical."""
    g = torch.Generator().manual_seed(0)
    p, q = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.25, 0.25, 0.25, 0.25])
    exact = float((p * (p / q).log()).sum())
    samples = torch.multinomial(p, 200_000, replacement=True, generator=g)
    logp, logq = p.log()[samples], q.log()[samples]
    for kind in ("k1", "k3"):
        assert float(kl_estimate(logp, logq, kind).mean()) == pytest.approx(exact, abs=3e-3)


def test_ppo_policy_loss_by_hand():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[1.5, 0.5, 1.1, 1.0]]))  # ratios 1.5, 0.5, 1.1, 1 (masked out)
    adv = torch.tensor([[1.0, 1.0, -2.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, m = ppo_policy_loss(logp, old, adv, mask, cliprange=0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped); token 1: max(-0.5, -0.8) = -0.5; token 2: max(2.2, 2.2) = 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert m["clipfrac"].item() == pytest.approx(1 / 3)
    want_kl = (math.log(1.5) ** 2 + math.log(0.5) ** 2 + math.log(1.1) ** 2) / 6
    assert m["approx_kl"].item() == pytest.approx(want_kl, abs=1e-6)
    logp.requires_grad_(True)
    ppo_policy_loss(logp, old, adv, mask, 0.2)[0].backward()
    assert logp.grad[0, 0] == 0 and logp.grad[0, 3] == 0  # clipped and masked tokens pass no gradient


def test_clipped_value_loss_by_hand():
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.0]]), torch.tensor([[3.0, 0.1]])
    loss, m = clipped_value_loss(values, old, returns, torch.ones(1, 2), cliprange_value=0.2)
    # token 0: max((1-3)^2, (0.7-3)^2) = 5.29 (clipped wins); token 1: 0.01
    assert loss.item() == pytest.approx(0.5 * (5.29 + 0.01) / 2, abs=1e-6)
    assert m["vf_clipfrac"].item() == 0.5


def test_log_probs_entropy_and_explained_variance():
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(2, 3, 7, generator=g), torch.randint(0, 7, (2, 3), generator=g)
    want = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(token_logprobs(logits, labels), want)
    probs = torch.softmax(logits, -1)
    torch.testing.assert_close(entropy_from_logits(logits), -(probs * probs.log()).sum(-1))
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]])
    assert sequence_logprobs(want, mask).tolist() == pytest.approx([float(want[0, :2].sum()), float(want[1, 1:].sum())])
    returns = torch.randn(4, 5, generator=g)
    ones = torch.ones(4, 5)
    assert explained_variance(returns, returns, ones).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(returns, 3.0), returns, ones).item() == pytest.approx(0.0, abs=1e-6)


def test_running_moments_merge_batches_exactly():
    g = torch.Generator().manual_seed(0)
    chunks = [torch.randn(n, generator=g) * 3 + 1 for n in (5, 1, 17, 8)]
    moments = RunningMoments()
    for chunk in chunks:
        moments.update(chunk)
    everything = torch.cat(chunks).double()
    assert moments.count == 31
    assert moments.mean == pytest.approx(float(everything.mean()), abs=1e-12)
    assert moments.std == pytest.approx(float(everything.std(unbiased=False)), abs=1e-12)
    copy = RunningMoments()
    copy.load_state_dict(moments.state_dict())
    assert (copy.mean, copy.std) == (moments.mean, moments.std)


def test_masked_statistics_refuse_empty_masks():
    with pytest.raises(ValueError, match="selects nothing"):
        masked_mean(torch.ones(2, 2), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="needs 2"):
        masked_var(torch.ones(2, 2), torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(ValueError, match="shape"):
        masked_mean(torch.ones(2, 2), torch.ones(2, 3))
