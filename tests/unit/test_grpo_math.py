"""training.grpo_math against TRL 1.16's GRPOTrainer on the same tensors, and by hand.

- Advantages: TRL computes them inline in `GRPOTrainer._generate_and_score_completions` (after generation and reward
  calls), so its lines are transcribed below (trl/trainer/grpo_trainer.py, 1.16.0, lines 2761-2786, the
  `multi_objective_aggregation == "sum_then_normalize"` branch; `nanstd` is TRL's own, imported).
- Loss: TRL's own `GRPOTrainer._compute_loss` is called on a stand-in `self` whose per-token log-prob function
  returns our tensors; loss and gradients (w.r.t. the log-probs) must agree for loss_type grpo / bnpo / dapo /
  dr_grpo, with and without the KL term and with clip-higher.
- Overlong penalty: TRL's `trl.rewards.get_soft_overlong_punishment`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from training.grpo_math import group_advantages, grpo_policy_loss, missing_eos_penalty, overlong_penalty

torch.set_num_threads(1)


def trl_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str) -> torch.Tensor:
    """Transcribed from trl/trainer/grpo_trainer.py (1.16.0) lines 2761-2786 (one reward function, weight 1)."""
    from trl.trainer.utils import nanstd

    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    if scale_rewards in ["group", "none"]:
        std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)
        std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    elif scale_rewards == "batch":
        std_rewards = nanstd(rewards).expand_as(rewards)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0,   0.5, 0.5, 0.5, 0.5,   2.0, -1.0, 0.3, 0.7,   0.0, 0.0, 0.0, 1.0])


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_equal_trl(scale):
    ours, metrics = group_advantages(REWARDS, 4, scale)
    torch.testing.assert_close(ours, trl_advantages(REWARDS, 4, scale), atol=1e-6, rtol=1e-6)
    assert ours[4:8].eq(0).all()  # the all-equal group
    assert metrics["zero_std_groups"].item() == 1 and metrics["zero_std_fraction"].item() == 0.25


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 6), st.integers(2, 6), st.sampled_from(["group", "batch", "none"]), st.data())
def test_advantages_equal_trl_on_random_rewards(groups, size, scale, data):
    values = data.draw(st.lists(st.sampled_from([0.0, 0.25, 1.0, -2.0, 3.5]), min_size=groups * size,
                                max_size=groups * size))
    rewards = torch.tensor(values)
    ours, metrics = group_advantages(rewards, size, scale)
    assert torch.isfinite(ours).all()
    torch.testing.assert_close(ours, trl_advantages(rewards, size, scale), atol=1e-4, rtol=1e-4)
    flat = [len(set(values[i * size : (i + 1) * size])) == 1 for i in range(groups)]
    assert metrics["zero_std_groups"].item() == sum(flat)
    for i, is_flat in enumerate(flat):
        if is_flat:
            assert ours[i * size : (i + 1) * size].eq(0).all()  # exactly zero, not a rounding residue
    grouped = ours.view(groups, size).double()
    assert grouped.sum(1).abs().max() < 1e-4  # advantages are centred within each group


def test_all_equal_rewards_give_zero_advantages_not_nan():
    for scale in ("group", "batch", "none"):
        adv, m = group_advantages(torch.full((8,), 0.1), 4, scale)  # 0.1 is not exact in binary
        assert adv.eq(0).all() and m["zero_std_groups"].item() == 2
    with pytest.raises(ValueError, match="group_size >= 2"):
        group_advantages(torch.ones(3), 1)
    with pytest.raises(ValueError, match="multiple"):
        group_advantages(torch.ones(5), 2)


# ------------------------------------------------------------------------------------------------------ loss


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_loss(logps, old, ref, advantages, mask, loss_type, beta, eps_low, eps_high, max_len):
    """TRL's GRPOTrainer._compute_loss on our tensors: one process, no accumulation, no vLLM, no entropy bonus."""
    from trl import GRPOTrainer

    entropies = torch.zeros_like(logps)
    stub = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, entropies, None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1), loss_type=loss_type,
        epsilon_low=eps_low, epsilon_high=eps_high, use_vllm=False, model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, max_completion_length=max_len, _entropy_bonus_enabled=False,
        aux_loss_enabled=False, accelerator=_Accelerator(), _metrics={"train": defaultdict(list)},
    )
    stub.accelerator.num_processes = 1
    n, t = logps.shape
    inputs = {"prompt_ids": torch.ones(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2, dtype=torch.long),
              "completion_ids": torch.ones(n, t, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "num_items_in_batch": mask.sum()}
    if beta:
        inputs["ref_per_token_logps"] = ref
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, {k: v[-1] for k, v in stub._metrics["train"].items()}


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    n, t = 6, 7
    old = -torch.rand(n, t, generator=g) * 3  # (N, T)
    logps = old + 0.3 * torch.randn(n, t, generator=g)  # the policy moved: some ratios leave the clip range
    ref = old + 0.2 * torch.randn(n, t, generator=g)
    lengths = torch.tensor([7, 3, 5, 1, 6, 4])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).long()  # (N, T)
    advantages = torch.tensor([1.2, -0.7, 0.0, 2.0, -1.5, 0.4])
    return logps, old, ref, advantages, mask


@pytest.mark.parametrize("aggregation,loss_type", [("sequence", "grpo"), ("token", "bnpo"), ("token", "dapo"),
                                                   ("constant", "dr_grpo")])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("eps_high", [0.2, 0.28])
def test_loss_and_gradients_equal_trl(aggregation, loss_type, beta, eps_high):
    logps, old, ref, advantages, mask = _tensors()
    ours_in, theirs_in = logps.clone().requires_grad_(True), logps.clone().requires_grad_(True)
    loss, metrics = grpo_policy_loss(ours_in, old, advantages, mask, 0.2, eps_high, ref if beta else None, beta,
                                     aggregation, max_completion_length=7)
    loss.backward()
    trl_loss, trl_metrics = _trl_loss(theirs_in, old, ref, advantages, mask, loss_type, beta, 0.2, eps_high, 7)
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6) and loss.item() != 0.0
    torch.testing.assert_close(ours_in.grad, theirs_in.grad, atol=1e-7, rtol=1e-5)
    assert metrics["clip_ratio_low"].item() == pytest.approx(trl_metrics["clip_ratio/low_mean"], abs=1e-6)
    assert metrics["clip_ratio_high"].item() == pytest.approx(trl_metrics["clip_ratio/high_mean"], abs=1e-6)
    assert metrics["clip_ratio"].item() == pytest.approx(trl_metrics["clip_ratio/region_mean"], abs=1e-6)
    assert metrics["clip_ratio"].item() > 0
    if beta:
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], abs=1e-6)
    else:
        assert "kl" not in metrics


def test_loss_by_hand_and_first_update():
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    logps = torch.log(torch.tensor([[0.5, 0.5, 1.0], [0.2, 0.4, 0.1]]))
    adv = torch.tensor([1.0, -2.0])
    # the first update after a rollout: rho = 1, the loss is -mean(A) weighted by the aggregation
    loss, m = grpo_policy_loss(logps, logps, adv, mask, aggregation="sequence")
    assert loss.item() == pytest.approx(-(1.0 - 2.0) / 2) and m["ratio"].item() == pytest.approx(1.0)
    loss, _ = grpo_policy_loss(logps, logps, adv, mask, aggregation="token")
    assert loss.item() == pytest.approx(-(2 * 1.0 + 3 * -2.0) / 5)
    loss, _ = grpo_policy_loss(logps, logps, adv, mask, aggregation="constant", max_completion_length=4)
    assert loss.item() == pytest.approx(-(2 * 1.0 + 3 * -2.0) / (2 * 4))
    # k3 at the reference is 0; away from it, r - log r - 1 with r = ref / pi
    ref = logps + math.log(2.0)
    _, m = grpo_policy_loss(logps, logps, adv, mask, ref_logps=ref, kl_coef=0.1, aggregation="token")
    assert m["kl"].item() == pytest.approx(2 - math.log(2) - 1, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_policy_loss(logps, logps, adv, mask, kl_coef=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_policy_loss(logps, logps, adv, mask, aggregation="constant")


# ------------------------------------------------------------------------------------------------ penalties


@pytest.mark.parametrize("max_len,cache", [(100, 20), (10, 10), (8, 1)])
def test_overlong_penalty_equals_trl(max_len, cache):
    from trl.rewards import get_soft_overlong_punishment

    lengths = list(range(0, max_len + 5))
    want = get_soft_overlong_punishment(max_len, cache)([[1] * n for n in lengths])
    got = overlong_penalty(torch.tensor(lengths), max_len, cache)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float32))


def test_missing_eos_penalty():
    got = missing_eos_penalty(torch.tensor([True, False, True]), 0.5)
    assert got.tolist() == [0.0, -0.5, 0.0]
