"""SimPO, ORPO and KTO (training.losses): hand-computed values, and parity with TRL 1.16 on the same tensors, loss
and gradients.

- SimPO: TRL's `CPOTrainer.cpo_loss` (trl/experimental/cpo/cpo_trainer.py, loss_type="simpo", alpha=0) called on
  the length-normalised log-probs our loss computes from summed log-probs and lengths.
- ORPO: TRL's `ORPOTrainer.odds_ratio_loss` (trl/experimental/orpo/orpo_trainer.py), and its full loss
  `nll - losses.mean()` (get_batch_loss_metrics), with TRL's NLL handed to ours through `nll=`.
  Where we differ on purpose: by default our SFT term is the chosen completion's mean NLL (the paper's Eq. 2), while
  TRL's runs over prompt and completion tokens together.
- KTO: TRL 1.16 computes the loss inside `KTOTrainer._compute_loss` (trl/trainer/kto_trainer.py), so a KTOTrainer
  is built on tiny models and its own collated batch; our step runs on the same token tensors. Tokenization and the
  mismatched (KL) rows are compared too.
"""

from __future__ import annotations

import copy
import math
import os
from types import SimpleNamespace

import pytest
import torch

from training.losses import kto_loss, kto_reference_point, log1mexp, orpo_loss, simpo_loss

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
torch.set_num_threads(1)

SUMS = {"chosen": torch.tensor([-10.0, -24.0, -3.0]), "rejected": torch.tensor([-12.0, -18.0, -9.0])}
TOKENS = {"chosen": torch.tensor([5.0, 8.0, 3.0]), "rejected": torch.tensor([4.0, 9.0, 3.0])}
# per-token means: chosen [-2, -3, -1], rejected [-3, -2, -3]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _leaves():
    return {k: v.clone().requires_grad_(True) for k, v in SUMS.items()}


# ----------------------------------------------------------------------------------------------------- SimPO


def test_simpo_by_hand():
    beta, gamma = 2.0, 0.5
    loss, m = simpo_loss(SUMS["chosen"], SUMS["rejected"], TOKENS["chosen"], TOKENS["rejected"], beta, gamma)
    hs = [beta * (c - r) - gamma for c, r in ((-2, -3), (-3, -2), (-1, -3))]
    assert loss.item() == pytest.approx(sum(-math.log(_sig(h)) for h in hs) / 3, abs=1e-6)
    assert m["reward_chosen"].item() == pytest.approx(beta * -2.0, abs=1e-6)
    assert m["accuracy"].item() == pytest.approx(2 / 3)
    assert m["logps_chosen"].item() == pytest.approx(-2.0)
    with pytest.raises(ValueError, match="beta > 0"):
        simpo_loss(SUMS["chosen"], SUMS["rejected"], TOKENS["chosen"], TOKENS["rejected"], beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        simpo_loss(SUMS["chosen"], SUMS["rejected"][:2], TOKENS["chosen"], TOKENS["rejected"])


def _bind(method, **attrs):
    """TRL's method on a stand-in `self` holding just the attributes it reads."""
    stub = SimpleNamespace(accelerator=SimpleNamespace(device=torch.device("cpu")), **attrs)
    return lambda *args: method(stub, *args)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 0.5, 0.0), (0.1, 0.0, 0.0), (2.5, 1.4, 0.2)])
def test_simpo_equals_trl_cpo_trainer_simpo(beta, gamma, label_smoothing):
    from trl.experimental.cpo import CPOTrainer

    ours, theirs = _leaves(), _leaves()
    loss, m = simpo_loss(ours["chosen"], ours["rejected"], TOKENS["chosen"], TOKENS["rejected"], beta, gamma,
                         label_smoothing)
    loss.backward()
    trl = _bind(CPOTrainer.cpo_loss, alpha=0.0, loss_type="simpo", beta=beta, simpo_gamma=gamma,
                label_smoothing=label_smoothing)
    # TRL's concatenated_forward averages the log-probs per token (average_log_prob=True for simpo) before cpo_loss
    losses, chosen_rewards, rejected_rewards = trl(theirs["chosen"] / TOKENS["chosen"],
                                                   theirs["rejected"] / TOKENS["rejected"])
    losses.mean().backward()
    assert loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(ours[side].grad, theirs[side].grad, atol=1e-7, rtol=1e-5)
    assert m["reward_chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)
    assert m["reward_rejected"].item() == pytest.approx(rejected_rewards.mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------ ORPO


def test_log1mexp_is_accurate_on_both_branches():
    from decimal import Decimal, getcontext

    getcontext().prec = 50
    xs = [-1e-8, -1e-3, -0.5, -math.log(2), -1.0, -30.0]
    exact = torch.tensor([float((1 - Decimal(x).exp()).ln()) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(torch.tensor(xs, dtype=torch.float64)), exact, rtol=1e-12, atol=0)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-6]))).all()


def test_orpo_by_hand():
    lam = 0.25
    loss, m = orpo_loss(SUMS["chosen"], SUMS["rejected"], TOKENS["chosen"], TOKENS["rejected"], lam)
    odds = lambda lp: lp - math.log(1 - math.exp(lp))  # noqa: E731
    pairs = ((-2, -3), (-3, -2), (-1, -3))
    ratio = [math.log(_sig(odds(c) - odds(r))) for c, r in pairs]
    nll = (2 + 3 + 1) / 3
    assert loss.item() == pytest.approx(nll - lam * sum(ratio) / 3, abs=1e-6)
    assert m["nll"].item() == pytest.approx(nll, abs=1e-6)
    assert m["log_odds_ratio"].item() == pytest.approx(sum(ratio) / 3, abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(sum(odds(c) - odds(r) for c, r in pairs) / 3, abs=1e-6)


@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_orpo_equals_trl_orpo_trainer(lam):
    from trl.experimental.orpo import ORPOTrainer

    ours, theirs = _leaves(), _leaves()
    nll_ours, nll_theirs = (torch.tensor(1.7, requires_grad=True) for _ in range(2))  # e.g. TRL's prompt+completion NLL
    loss, m = orpo_loss(ours["chosen"], ours["rejected"], TOKENS["chosen"], TOKENS["rejected"], lam, nll=nll_ours)
    loss.backward()
    trl = _bind(ORPOTrainer.odds_ratio_loss, beta=lam)  # TRL calls ORPO's lambda `beta`
    losses, chosen_rewards, rejected_rewards, log_odds_ratio, log_odds_chosen = trl(
        theirs["chosen"] / TOKENS["chosen"], theirs["rejected"] / TOKENS["rejected"])
    trl_loss = nll_theirs - losses.mean()  # ORPOTrainer.get_batch_loss_metrics
    trl_loss.backward()
    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6)
    for side in ("chosen", "rejected"):
        torch.testing.assert_close(ours[side].grad, theirs[side].grad, atol=1e-7, rtol=1e-5)
    assert nll_ours.grad.item() == nll_theirs.grad.item() == 1.0
    assert m["log_odds_ratio"].item() == pytest.approx(log_odds_ratio.item(), abs=1e-6)
    assert m["log_odds_chosen"].item() == pytest.approx(log_odds_chosen.item(), abs=1e-6)
    assert m["reward_chosen"].item() == pytest.approx(chosen_rewards.mean().item(), abs=1e-6)


# ------------------------------------------------------------------------------------------------------- KTO


def test_kto_by_hand():
    policy, ref = torch.tensor([-10.0, -20.0, -5.0]), torch.tensor([-11.0, -19.0, -5.5])  # r = [1, -1, 0.5]
    desirable = torch.tensor([True, False, True])
    z = kto_reference_point(torch.tensor([-7.0, -8.0]), torch.tensor([-7.5, -8.1]))  # mean(0.5, 0.1) = 0.3
    assert z.item() == pytest.approx(0.3, abs=1e-6)
    assert kto_reference_point(torch.tensor([-9.0]), torch.tensor([-8.0])).item() == 0.0  # clamped at 0
    beta, wd, wu = 0.5, 1.0, 1.5
    loss, m = kto_loss(policy, ref, desirable, z, beta, wd, wu)
    want = [wd * (1 - _sig(beta * (1 - 0.3))), wu * (1 - _sig(beta * (0.3 + 1))), wd * (1 - _sig(beta * (0.5 - 0.3)))]
    assert loss.item() == pytest.approx(sum(want) / 3, abs=1e-6)
    assert m["kl"].item() == pytest.approx(0.3, abs=1e-6)
    assert m["reward_chosen"].item() == pytest.approx(beta * 0.75, abs=1e-6)
    assert m["reward_rejected"].item() == pytest.approx(-beta, abs=1e-6)
    assert m["margin"].item() == pytest.approx(beta * 1.75, abs=1e-6)
    _, only_good = kto_loss(policy[:1], ref[:1], desirable[:1], z)
    assert "reward_rejected" not in only_good and "margin" not in only_good


KTO_RECORDS = [  # TRL's conversational unpaired format; tokenized the same by both
    {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
     "completion": [{"role": "assistant", "content": f"It is {2 * i}." if i % 2 == 0 else "No idea at all."}],
     "label": i % 2 == 0}
    for i in range(4)
]


@pytest.fixture(scope="module")
def kto_models(tmp_path_factory, smollm2_tokenizer_dir):
    from tests.helpers import make_tiny_llama_lm

    return (make_tiny_llama_lm(tmp_path_factory.mktemp("kto-policy"), smollm2_tokenizer_dir, seed=0),
            make_tiny_llama_lm(tmp_path_factory.mktemp("kto-ref"), smollm2_tokenizer_dir, seed=1))


@pytest.fixture(scope="module")
def kto_trainer(kto_models, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import KTOConfig, KTOTrainer

    from rewardmodel.modeling import load_tokenizer, resolve_model

    policy_dir, ref_dir = kto_models
    args = KTOConfig(output_dir=str(tmp_path_factory.mktemp("trl-kto")), report_to=[], beta=0.1, use_cpu=True,
                     per_device_train_batch_size=len(KTO_RECORDS), bf16=False, max_length=None,
                     desirable_weight=1.0, undesirable_weight=1.3)
    return KTOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir), ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=args, train_dataset=Dataset.from_list(KTO_RECORDS),
        processing_class=load_tokenizer(resolve_model(str(policy_dir))),
    )


def _trl_batch(trainer):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(len(KTO_RECORDS))])


def test_kto_tokens_and_mismatched_rows_match_trl(kto_trainer, kto_models):
    from training.kto import KTOCollator, load_unpaired, tokenize_unpaired
    from training.policy import load_policy

    tokenizer = load_policy(str(kto_models[0]))[1]
    items = tokenize_unpaired(tokenizer, load_unpaired(KTO_RECORDS), max_length=512)
    for item, theirs in zip(items, kto_trainer.train_dataset):
        assert (item.prompt, item.completion) == (theirs["prompt_ids"], theirs["completion_ids"])
    ours, trl = KTOCollator(tokenizer.pad_token_id, 512)(items), _trl_batch(kto_trainer)
    for name, key in (("input_ids", "input_ids"), ("attention_mask", "attention_mask"),
                      ("completion_mask", "completion_mask"), ("kl_input_ids", "KL_input_ids"),
                      ("kl_attention_mask", "KL_attention_mask"), ("kl_completion_mask", "KL_completion_mask")):
        assert torch.equal(getattr(ours, name), trl[key]), name
    assert torch.equal(ours.desirable, trl["label"])


def test_kto_step_equals_trl_kto_trainer(kto_trainer, kto_models):
    from training.dpo import DPOModule
    from training.kto import KTOBatch, kto_step
    from training.policy import frozen_copy, load_policy

    trainer = kto_trainer
    trainer.model.train()
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics["train"].values():
        values.clear()
    batch = _trl_batch(trainer)
    trl_loss = trainer.compute_loss(trainer.model, batch)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trl_metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}

    module = DPOModule(copy.deepcopy(load_policy(str(kto_models[0]))[0]), frozen_copy(load_policy(str(kto_models[1]))[0]))
    ours = KTOBatch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], batch["KL_input_ids"],
                    batch["KL_attention_mask"], batch["KL_completion_mask"], batch["label"])
    loss, metrics = kto_step(module, ours, beta=0.1, desirable_weight=1.0, undesirable_weight=1.3)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.policy.named_parameters() if p.grad is not None}

    assert loss.item() == pytest.approx(trl_loss.item(), abs=1e-6) and loss.item() != 0.0
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-6, rtol=1e-4)
    for key, theirs in (("kl", "kl"), ("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                        ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected"),
                        ("margin", "rewards/margins")):
        assert metrics[key].item() == pytest.approx(trl_metrics[theirs], abs=1e-5), key


def test_hh_pairs_split_into_a_desirable_and_an_undesirable_example():
    from training.kto import load_unpaired

    hh = {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."}
    good, bad = load_unpaired([hh])
    assert good.prompt_messages == bad.prompt_messages == [{"role": "user", "content": "Hi"}]
    assert (good.desirable, good.completion[-1]["content"]) == (True, "Hello!")
    assert (bad.desirable, bad.completion[-1]["content"]) == (False, "Go away.")
    plain = load_unpaired([{"prompt": "Hi", "completion": "Hello!", "label": False}])
    assert plain[0].completion == [{"role": "assistant", "content": "Hello!"}] and not plain[0].desirable
    with pytest.raises(ValueError, match="KTO record 0: label"):
        load_unpaired([{"prompt": "Hi", "completion": "Hello!", "label": "yes"}])


def test_orpo_loss_gradient_is_finite_near_probability_one():
    c = torch.tensor([-1e-4, -2.0], requires_grad=True)
    loss, _ = orpo_loss(c, torch.tensor([-3.0, -2.5]), torch.ones(2), torch.ones(2))
    loss.backward()
    assert torch.isfinite(c.grad).all() and torch.isfinite(loss)
