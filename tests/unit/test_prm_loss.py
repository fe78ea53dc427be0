"""The PRM loss (training/prm_loss.py) and batches (training/prm_batch.py): labels live only at step ends, the loss
and its gradient only there; equal to hand-computed values and to transformers' own token-classification loss (what
TRL's PRMTrainer optimizes)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rewardmodel.steps import PRMSpec, encode_steps
from training.prm_batch import IGNORE, StepCollator, StepExample, StepItem, encode_example
from training.prm_loss import batch_step_scores, prm_loss


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def test_the_loss_is_the_step_cross_entropy_by_hand():
    logits = torch.zeros(1, 4, 2)
    logits[0, 1] = torch.tensor([0.0, 2.0])  # a good step, score +2
    logits[0, 3] = torch.tensor([1.0, 0.0])  # a bad step, score -1
    logits[0, 0] = torch.tensor([5.0, -5.0])  # not a step end: ignored whatever it holds
    labels = torch.tensor([[IGNORE, 1, IGNORE, 0]])
    loss, metrics = prm_loss(logits, labels)
    expected = (-math.log(sig(2.0)) - math.log(1 - sig(-1.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert metrics["step_accuracy"].item() == 1.0 and metrics["good_fraction"].item() == 0.5


def test_the_gradient_reaches_only_the_labelled_step_ends():
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 2, requires_grad=True)
    labels = torch.full((2, 6), IGNORE)
    labels[0, 2], labels[0, 5], labels[1, 3] = 1, 0, 1
    loss, _ = prm_loss(logits, labels)
    loss.backward()
    touched = logits.grad.abs().sum(-1) > 0  # (B, T)
    assert touched.tolist() == (labels != IGNORE).tolist()


def test_equal_to_the_token_classification_loss_transformers_computes(tiny_bert_dir):
    from transformers import AutoModelForTokenClassification

    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(tiny_bert_dir, num_labels=2, ignore_mismatched_sizes=True)
    ids = torch.randint(1000, 2000, (3, 7))
    labels = torch.full((3, 7), IGNORE)
    labels[0, 3], labels[1, 6], labels[2, 1], labels[2, 4] = 1, 0, 0, 1
    out = model(input_ids=ids, labels=labels)
    ours, _ = prm_loss(out.logits, labels)
    assert ours.item() == pytest.approx(out.loss.item(), abs=1e-6)
    flat = F.cross_entropy(out.logits.view(-1, 2), labels.view(-1), ignore_index=IGNORE)
    assert ours.item() == pytest.approx(flat.item(), abs=1e-6)


def test_one_label_and_good_label_zero_heads_read_the_same_log_odds():
    labels = torch.tensor([[1, 0]])
    two = torch.tensor([[[0.0, 1.5], [0.0, -0.5]]])  # scores 1.5, -0.5
    swapped = two.flip(-1)  # good is label 0 now
    one = torch.tensor([[[1.5], [-0.5]]])
    want = prm_loss(two, labels)[0].item()
    assert prm_loss(swapped, labels, PRMSpec(good_label=0))[0].item() == pytest.approx(want, abs=1e-6)
    assert prm_loss(one, labels, PRMSpec(num_labels=1, good_label=0))[0].item() == pytest.approx(want, abs=1e-6)


def test_no_labelled_step_gives_a_zero_loss_with_a_graph():
    logits = torch.randn(1, 3, 2, requires_grad=True)
    loss, metrics = prm_loss(logits, torch.full((1, 3), IGNORE))
    loss.backward()
    assert loss.item() == 0.0 and logits.grad.abs().sum() == 0 and set(metrics) == {"step_accuracy", "good_fraction"}


def test_batches_put_labels_at_the_encode_steps_ends(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ex = StepExample("What is 2 + 3?", ["2 + 3 = 5", "so 5", "#### 5"], [True, False, False])
    item = encode_example(tok, ex, 64)
    enc = encode_steps(tok, ex.prompt, ex.steps, 64)
    assert (item.input_ids, item.step_ends, item.labels) == (enc.input_ids, enc.step_ends, ex.labels)
    short = StepItem([5, 6, 7], [1, 2], [True, True])
    batch = StepCollator(pad_token_id=0)([item, short])
    assert batch.input_ids.shape == (2, len(item.input_ids))
    row0 = {j: batch.labels[0, j].item() for j in range(batch.labels.shape[1]) if batch.labels[0, j] != IGNORE}
    assert row0 == dict(zip(enc.step_ends, [1, 0, 0]))
    assert batch.step_mask[0].nonzero().flatten().tolist() == enc.step_ends
    assert batch.attention_mask[1].tolist()[:4] == [1, 1, 1, 0]
    last_only = StepCollator(0, train_on_last_step_only=True)([item])
    assert (last_only.labels != IGNORE).nonzero()[:, 1].tolist() == [enc.step_ends[-1]]
    assert last_only.step_mask.sum().item() == 3  # every step is still read


def test_steps_past_max_length_are_cut_from_the_end_and_unreadable_examples_dropped(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    ex = StepExample("a long question " * 20, ["one two three four"] * 6, [True, True, True, False, False, False])
    full = encode_steps(tok, "", ex.steps, 1000)
    per_step = (len(full.input_ids) - 1) // 6
    item = encode_example(tok, ex, 1 + 3 * per_step)  # BOS + three steps, no prompt
    assert item.labels == [True, True, True] and item.steps_dropped == 3 and item.truncated
    assert encode_example(tok, ex, per_step) is None  # not even the first step fits


def test_batch_step_scores_follow_the_step_mask():
    logits = torch.zeros(2, 4, 2)
    logits[..., 1] = torch.arange(8.0).view(2, 4)
    mask = torch.tensor([[False, True, False, True], [True, False, False, False]])
    scores = batch_step_scores(logits, mask, PRMSpec())
    assert [s.tolist() for s in scores] == [[1.0, 3.0], [4.0]]
