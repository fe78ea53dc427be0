"""training.losses.dpo_loss: hand-computed values, and parity with TRL 1.16's DPOTrainer on identical tiny models
and batches (the trainer's own tokenization, collator and compute_loss; TRL is a test-only dependency).

Where our definition differs from TRL 1.16 on purpose:
- `sigmoid` with label_smoothing e > 0 is conservative DPO, -(1-e) log s(bh) - e log s(-bh); TRL 1.16's `sigmoid`
  ignores label_smoothing (it keeps it for `robust`, `exo_pair`, `aot`). At e = 0 both are the same.
- `hinge` and `ipo` with label_smoothing > 0 are an error for us; TRL ignores the value.
- Tokens: a plain-string prompt/completion record is rendered with the chat template here (training.data turns it
  into messages), while TRL tokenizes such strings as raw text + EOS. Conversational records tokenize the same.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from training.data import load_preferences
from training.dpo import (
    DPOBatch,
    DPOCollator,
    DPOItem,
    DPOModule,
    dpo_step,
    tokenize_pairs,
)
from training.losses import dpo_loss
from training.policy import frozen_copy, load_policy

torch.set_num_threads(1)

LOGPS = {  # B = 2 pairs: policy and reference log-probs of the chosen and rejected completions
    "policy_chosen_logps": torch.tensor([-10.0, -20.0]), "policy_rejected_logps": torch.tensor([-12.0, -18.0]),
    "ref_chosen_logps": torch.tensor([-11.0, -19.0]), "ref_rejected_logps": torch.tensor([-11.5, -18.5]),
}
# log-ratios: chosen [1, -1], rejected [-0.5, 0.5]; h = [1.5, -1.5]


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# ---------------------------------------------------------------------------------------- hand-computed


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_sigmoid_and_conservative_dpo_by_hand(beta):
    loss, m = dpo_loss(**LOGPS, beta=beta)
    want = (-math.log(_sig(1.5 * beta)) - math.log(_sig(-1.5 * beta))) / 2
    assert loss.item() == pytest.approx(want, abs=1e-6)
    e = 0.2
    loss, _ = dpo_loss(**LOGPS, beta=beta, label_smoothing=e)
    per_pair = [-(1 - e) * math.log(_sig(beta * h)) - e * math.log(_sig(-beta * h)) for h in (1.5, -1.5)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, abs=1e-6)
    assert m["reward_chosen"].item() == pytest.approx(beta * (1 - 1) / 2, abs=1e-6)
    assert m["reward_rejected"].item() == pytest.approx(beta * (-0.5 + 0.5) / 2, abs=1e-6)
    assert m["accuracy"].item() == 0.5  # pair 0 wins (1 > -0.5), pair 1 loses (-1 < 0.5)
    assert m["margin"].item() == pytest.approx(beta * (1.5 - 1.5) / 2, abs=1e-6)
    assert m["logps_chosen"].item() == -15.0 and m["logps_rejected"].item() == -15.0


def test_robust_hinge_ipo_by_hand():
    beta, e = 0.5, 0.1
    loss, _ = dpo_loss(**LOGPS, beta=beta, loss_type="robust", label_smoothing=e)
    per_pair = [(-(1 - e) * math.log(_sig(beta * h)) + e * math.log(_sig(-beta * h))) / (1 - 2 * e) for h in (1.5, -1.5)]
    assert loss.item() == pytest.approx(sum(per_pair) / 2, abs=1e-6)

    loss, _ = dpo_loss(**LOGPS, beta=beta, loss_type="hinge")
    assert loss.item() == pytest.approx((max(0, 1 - 0.75) + max(0, 1 + 0.75)) / 2, abs=1e-6)

    loss, _ = dpo_loss(**LOGPS, beta=beta, loss_type="ipo")  # the paper's sequence-level Eq. 17
    assert loss.item() == pytest.approx(((1.5 - 1.0) ** 2 + (-1.5 - 1.0) ** 2) / 2, abs=1e-6)
    tokens_c, tokens_r = torch.tensor([2.0, 4.0]), torch.tensor([1.0, 5.0])  # per-token normalized (TRL's)
    loss, _ = dpo_loss(**LOGPS, beta=beta, loss_type="ipo", chosen_tokens=tokens_c, rejected_tokens=tokens_r)
    h = [1 / 2 - (-0.5) / 1, -1 / 4 - 0.5 / 5]
    assert loss.item() == pytest.approx(sum((x - 1.0) ** 2 for x in h) / 2, abs=1e-6)


def test_bad_arguments_are_errors():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(**LOGPS, loss_type="kto")
    with pytest.raises(ValueError, match="does not apply"):
        dpo_loss(**LOGPS, loss_type="hinge", label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"\[0, 0.5\)"):
        dpo_loss(**LOGPS, loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(**LOGPS, beta=0.0)
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(torch.zeros(2), torch.zeros(3), torch.zeros(2), torch.zeros(2))


# ------------------------------------------------------------------------------------------ TRL parity

RECORDS = [  # conversational (TRL's explicit-prompt conversational format): tokenized the same by both
    {"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
     "chosen": [{"role": "assistant", "content": f"It is {2 * i}. " * (1 + i)}],
     "rejected": [{"role": "assistant", "content": "No idea." if i % 2 else "Maybe five?"}]}
    for i in range(3)
]
RECORDS.append({  # multi-turn prompt
    "prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
               {"role": "user", "content": "Name a colour."}],
    "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "No."}]})
# TRL 1.16 runs its fused LM head over every position on CPU (about 2 s per call here on a 49k vocabulary), so the
# batch is small and the variants are few.


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_tokenizer_dir):
    from tests.helpers import make_tiny_llama_lm

    policy_dir = make_tiny_llama_lm(tmp_path_factory.mktemp("policy"), smollm2_tokenizer_dir, seed=0)
    ref_dir = make_tiny_llama_lm(tmp_path_factory.mktemp("ref"), smollm2_tokenizer_dir, seed=1)
    return policy_dir, ref_dir


@pytest.fixture(scope="module")
def trl_trainer(models, tmp_path_factory):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from rewardmodel.modeling import load_tokenizer, resolve_model

    policy_dir, ref_dir = models
    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("trl")), report_to=[], per_device_train_batch_size=len(RECORDS),
                     beta=0.1, loss_type=["sigmoid"], use_cpu=True, bf16=False, max_length=None)
    return DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(policy_dir), ref_model=AutoModelForCausalLM.from_pretrained(ref_dir),
        args=args, train_dataset=Dataset.from_list(RECORDS), processing_class=load_tokenizer(resolve_model(str(policy_dir))),
    )


def test_tokens_match_trl_for_conversational_records(trl_trainer, models):
    tokenizer = load_policy(str(models[0]))[1]
    ours = tokenize_pairs(tokenizer, load_preferences(RECORDS), max_length=512)
    for item, theirs in zip(ours, trl_trainer.train_dataset):
        assert (item.prompt, item.chosen, item.rejected) == (theirs["prompt_ids"], theirs["chosen_ids"], theirs["rejected_ids"])
    batch = DPOCollator(tokenizer.pad_token_id)(ours)
    trl_batch = trl_trainer.data_collator([trl_trainer.train_dataset[i] for i in range(len(RECORDS))])
    assert torch.equal(batch.input_ids, trl_batch["input_ids"])
    assert torch.equal(batch.attention_mask, trl_batch["attention_mask"])
    assert torch.equal(batch.completion_mask, trl_batch["completion_mask"])


def _trl_loss(trainer, loss_type: str, beta: float, label_smoothing: float, grads: bool = True):
    """TRL's _compute_loss on its own collated batch; the variant is set on the built trainer (init reads these
    three from its args into attributes; building one trainer per variant would only repeat the tokenization)."""
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    trainer.beta, trainer.label_smoothing = beta, label_smoothing
    for values in trainer._metrics["train"].values():
        values.clear()
    trainer.model.train()  # compute_loss files its metrics under "train" only in train mode
    trainer.model.zero_grad(set_to_none=True)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(RECORDS))])
    with torch.enable_grad() if grads else torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    if grads:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads


@pytest.fixture(scope="module")
def ours(models):
    """(policy, frozen reference, tokenizer) loaded the way train_dpo loads them; tests train deep copies."""
    policy, tokenizer, _ = load_policy(str(models[0]))
    return policy, frozen_copy(load_policy(str(models[1]))[0]), tokenizer


def _module_and_batch(ours) -> tuple[DPOModule, DPOBatch]:
    policy, ref, tokenizer = ours
    batch = DPOCollator(tokenizer.pad_token_id)(tokenize_pairs(tokenizer, load_preferences(RECORDS), 512))
    return DPOModule(copy.deepcopy(policy), ref), batch


def _our_loss(ours, loss_type: str, beta: float, label_smoothing: float):
    module, batch = _module_and_batch(ours)
    policy = module.policy
    loss, metrics = dpo_step(module, batch, beta, loss_type, label_smoothing)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


@pytest.mark.parametrize("loss_type,beta,label_smoothing", [
    ("sigmoid", 0.1, 0.0), ("ipo", 0.5, 0.0), ("hinge", 0.1, 0.0), ("hinge", 5.0, 0.0), ("robust", 0.5, 0.2),
])
def test_parity_with_trl_dpo_trainer(trl_trainer, ours, loss_type, beta, label_smoothing):
    trl_loss, trl_metrics, trl_grads = _trl_loss(trl_trainer, loss_type, beta, label_smoothing)
    loss, metrics, grads = _our_loss(ours, loss_type, beta, label_smoothing)
    assert abs(loss.item() - trl_loss.item()) <= 1e-5, (loss.item(), trl_loss.item())
    assert loss.item() != 0.0
    for key, theirs in (("reward_chosen", "rewards/chosen"), ("reward_rejected", "rewards/rejected"),
                         ("accuracy", "rewards/accuracies"), ("margin", "rewards/margins"),
                         ("logps_chosen", "logps/chosen"), ("logps_rejected", "logps/rejected")):
        assert metrics[key].item() == pytest.approx(trl_metrics[theirs], abs=1e-4), key
    assert grads.keys() == trl_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], trl_grads[name], atol=1e-5, rtol=1e-4)


def test_sigmoid_label_smoothing_differs_from_trl_on_purpose(trl_trainer, ours):
    trl_loss, _, _ = _trl_loss(trl_trainer, "sigmoid", 0.5, 0.2, grads=False)  # TRL 1.16 ignores label_smoothing here
    plain, _, _ = _our_loss(ours, "sigmoid", 0.5, 0.0)
    smoothed, _, _ = _our_loss(ours, "sigmoid", 0.5, 0.2)
    assert abs(trl_loss.item() - plain.item()) <= 1e-5
    assert abs(smoothed.item() - plain.item()) > 1e-3
    # ours is the conservative-DPO mix of the two directions, checked from the per-pair margins
    module, batch = _module_and_batch(ours)
    with torch.no_grad():
        logps, ref = module(batch.input_ids, batch.attention_mask, batch.completion_mask)
    h = (logps - ref).chunk(2)[0] - (logps - ref).chunk(2)[1]
    want = (-0.8 * F.logsigmoid(0.5 * h) - 0.2 * F.logsigmoid(-0.5 * h)).mean()
    assert smoothed.item() == pytest.approx(want.item(), abs=1e-6)


def test_precomputed_reference_gives_the_same_loss(ours):
    from training.dpo import precompute_reference

    module, _ = _module_and_batch(ours)
    collate = DPOCollator(ours[2].pad_token_id)
    items = tokenize_pairs(ours[2], load_preferences(RECORDS), 512)
    live, _ = dpo_step(module, collate(items), 0.1, "sigmoid", 0.0)
    cached = precompute_reference(module, items, collate, batch_size=3)
    assert all(isinstance(i, DPOItem) and i.ref_chosen is not None for i in cached)
    module.ref = None
    pre, _ = dpo_step(module, collate(cached), 0.1, "sigmoid", 0.0)
    assert pre.item() == pytest.approx(live.item(), abs=1e-5)
