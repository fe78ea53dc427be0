"""bradley_terry_loss: hand-computed values, and parity with TRL 1.16's RewardTrainer.compute_loss."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from training.losses import bradley_terry_loss

LN2 = math.log(2.0)  # -log sigma(0) = log 2 = 0.6931471805599453
NLS1 = math.log1p(math.exp(-1.0))  # -log sigma(1) = log(1 + e^-1) = 0.31326168751822286
SIG1 = 1.0 / (1.0 + math.exp(-1.0))  # sigma(1) = 0.7310585786300049


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_plain_loss_and_metrics_by_hand():
    # gaps r_c - r_r = [1, 0] -> loss = (log(1+e^-1) + log 2) / 2 = (0.31326 + 0.69315) / 2 = 0.50320
    loss, m = bradley_terry_loss(t(1.0, 0.0), t(0.0, 0.0))
    assert loss.item() == pytest.approx((NLS1 + LN2) / 2, abs=1e-7)
    assert loss.item() == pytest.approx(0.5032044340390841, abs=1e-7)
    # pair 1 wins, pair 2 ties: strict accuracy 1/2, ties 1/2; means: chosen 0.5, rejected 0, gap 0.5
    assert m["accuracy"].item() == 0.5
    assert m["ties"].item() == 0.5
    assert m["reward_chosen"].item() == 0.5
    assert m["reward_rejected"].item() == 0.0
    assert m["margin"].item() == 0.5
    assert "center_penalty" not in m


def test_gradients_by_hand():
    # d loss / d r_c_i = -(1 - sigma(gap_i)) / B and d loss / d r_r_i = +(1 - sigma(gap_i)) / B
    # gaps [1, 0], B = 2 -> d/dr_c = [-(1 - 0.73106)/2, -(1 - 0.5)/2] = [-0.134471, -0.25]
    r_c = t(1.0, 0.0).requires_grad_()
    r_r = t(0.0, 0.0).requires_grad_()
    bradley_terry_loss(r_c, r_r)[0].backward()
    expected = t(-(1 - SIG1) / 2, -0.25)
    torch.testing.assert_close(r_c.grad, expected, atol=1e-7, rtol=0)
    torch.testing.assert_close(r_r.grad, -expected, atol=1e-7, rtol=0)


def test_margin_per_pair_by_hand():
    # gaps [2, 0] minus margins [1, 0] -> logits [1, 0] -> the same 0.50320 as above
    loss, m = bradley_terry_loss(t(2.0, 1.0), t(0.0, 1.0), margin=t(1.0, 0.0))
    assert loss.item() == pytest.approx((NLS1 + LN2) / 2, abs=1e-7)
    # metrics ignore the margin argument: accuracy 1/2 (second pair ties), mean gap (2 + 0) / 2 = 1
    assert m["accuracy"].item() == 0.5
    assert m["ties"].item() == 0.5
    assert m["margin"].item() == 1.0


def test_scalar_margin_by_hand():
    # gap 2, margin 2 -> logit 0 -> log 2; a float margin and a 0-dim tensor margin agree
    assert bradley_terry_loss(t(3.0), t(1.0), margin=2.0)[0].item() == pytest.approx(LN2, abs=1e-7)
    assert bradley_terry_loss(t(3.0), t(1.0), margin=torch.tensor(2.0))[0].item() == pytest.approx(LN2, abs=1e-7)


def test_centering_by_hand():
    # gaps [1, 0] -> BT part 0.50320; sums r_c + r_r = [1, -2] -> mean of squares (1 + 4) / 2 = 2.5
    # loss = 0.50320 + 0.01 * 2.5 = 0.52820
    loss, m = bradley_terry_loss(t(1.0, -1.0), t(0.0, -1.0), center_rewards_coefficient=0.01)
    assert loss.item() == pytest.approx((NLS1 + LN2) / 2 + 0.025, abs=1e-7)
    assert m["center_penalty"].item() == pytest.approx(2.5)


def test_extreme_gaps_stay_finite():
    # -log sigma(200) ~ e^-200 ~ 0 and -log sigma(-200) = 200 + log(1 + e^-200) ~ 200: logsigmoid does not overflow
    assert bradley_terry_loss(t(100.0), t(-100.0))[0].item() == pytest.approx(0.0, abs=1e-30)
    assert bradley_terry_loss(t(-100.0), t(100.0))[0].item() == pytest.approx(200.0)


def test_low_precision_inputs_are_upcast():
    loss, m = bradley_terry_loss(t(1.0, 0.0).bfloat16(), t(0.0, 0.0).bfloat16())
    assert loss.dtype == torch.float32 and m["accuracy"].dtype == torch.float32
    assert loss.item() == pytest.approx(0.5032044340390841, abs=1e-7)


@pytest.mark.parametrize(
    "chosen, rejected, margin",
    [
        (torch.zeros(2, 1), torch.zeros(2, 1), None),  # (B, 1): squeeze first
        (torch.zeros(2), torch.zeros(3), None),
        (torch.zeros(0), torch.zeros(0), None),
        (torch.zeros(2), torch.zeros(2), torch.zeros(3)),
    ],
)
def test_bad_shapes_are_refused(chosen, rejected, margin):
    with pytest.raises(ValueError):
        bradley_terry_loss(chosen, rejected, margin=margin)


# ---------------------------------------------------------------------------------------------------------
# Parity with TRL 1.16: we call TRL's own RewardTrainer.compute_loss (trl/trainer/reward_trainer.py, the
# method starting at line 778) unbound, with a stand-in `self` that has only what it reads (model.training,
# args.center_rewards_coefficient, accelerator.gather / gather_for_metrics, _metrics, _total_train_tokens,
# _tp_size) and a stand-in model returning fixed logits (2B, 1): rows [0, B) chosen, [B, 2B) rejected.
# ---------------------------------------------------------------------------------------------------------


class _IdentityAccelerator:
    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather


class _FixedLogitsModel:
    """Returns the given logits (2B, 1); accepts what compute_loss passes (input_ids, attention_mask,
    use_cache and, as TRL forwards every batch key to the model, margin)."""

    training = True

    def __init__(self, logits: torch.Tensor):
        self.logits = logits

    def __call__(self, **inputs) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def _trl_loss(logits: torch.Tensor, margin: torch.Tensor | None, coefficient: float | None):
    from trl.trainer.reward_trainer import RewardTrainer

    model = _FixedLogitsModel(logits)
    stub = SimpleNamespace(
        model=model,
        args=SimpleNamespace(center_rewards_coefficient=coefficient),
        accelerator=_IdentityAccelerator(),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    rows = logits.shape[0]
    inputs = {"input_ids": torch.zeros(rows, 3, dtype=torch.long), "attention_mask": torch.ones(rows, 3)}
    if margin is not None:
        inputs["margin"] = margin
    loss = RewardTrainer.compute_loss(stub, model, inputs)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize("use_margin", [False, True])
@pytest.mark.parametrize("coefficient", [None, 0.01, 0.5])
def test_parity_with_trl_reward_trainer(use_margin: bool, coefficient: float | None):
    g = torch.Generator().manual_seed(1234 + int(use_margin) + int((coefficient or 0) * 100))
    B = 16
    base = torch.randn(2 * B, 1, generator=g) * 3.0  # (2B, 1)
    base[3, 0] = base[B + 3, 0]  # one exact tie
    margin = torch.rand(B, generator=g) * 2.0 if use_margin else None  # (B,)

    trl_logits = base.clone().requires_grad_()
    trl_loss, trl_metrics = _trl_loss(trl_logits, margin, coefficient)
    trl_loss.backward()

    ours_logits = base.clone().requires_grad_()
    r_c, r_r = ours_logits.squeeze(-1).chunk(2)  # (B,), (B,)
    loss, metrics = bradley_terry_loss(r_c, r_r, margin=margin, center_rewards_coefficient=coefficient)
    loss.backward()

    assert abs(loss.item() - trl_loss.item()) <= 1e-6
    torch.testing.assert_close(ours_logits.grad, trl_logits.grad, atol=1e-6, rtol=0)
    assert metrics["accuracy"].item() == pytest.approx(trl_metrics["accuracy"][-1], abs=1e-7)
    assert metrics["margin"].item() == pytest.approx(trl_metrics["margin"][-1], abs=1e-6)
    assert metrics["ties"].item() == pytest.approx(1 / B)
