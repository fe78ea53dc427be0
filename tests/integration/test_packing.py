"""Padding-free (packed) forward passes give the same rewards as one-at-a-time padded ones."""

import random

import pytest
import torch

from service.backends import packing
from rewardmodel.modeling import load_reward_model, resolve_model, reward_forward


def _batch(seed, n, vocab, lo=3, hi=300):
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _one_by_one(model, batch):
    with torch.inference_mode():
        return torch.cat([
            reward_forward(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)) for ids in batch
        ])


@pytest.mark.parametrize("which", ["bert", "llama"])
def test_packed_equals_unpacked(which, tiny_bert_dir, tiny_llama_dir):
    model_dir = tiny_bert_dir if which == "bert" else tiny_llama_dir
    model = load_reward_model(resolve_model(str(model_dir)), torch.float32, "cpu")
    kind = packing.head_kind(model)
    assert kind == ("bert" if which == "bert" else "decoder")
    batch = _batch(0, 12, model.config.vocab_size)
    expected = _one_by_one(model, batch)
    model.set_attn_implementation(packing.register())
    with torch.inference_mode():
        got = packing.packed_reward_forward(model, kind, batch)
        # a sequence's reward does not depend on what it is packed with
        alone = torch.cat([packing.packed_reward_forward(model, kind, [ids]) for ids in batch])
    assert torch.allclose(got, expected, atol=1e-5), (got - expected).abs().max()
    assert torch.allclose(alone, got, atol=1e-5)


def test_real_minilm_packed_matches_padded():
    model = load_reward_model(resolve_model("minilm"), torch.float32, "cpu")
    batch = _batch(1, 6, model.config.vocab_size, 16, 500)
    expected = _one_by_one(model, batch)
    model.set_attn_implementation(packing.register())
    with torch.inference_mode():
        got = packing.packed_reward_forward(model, "bert", batch)
    assert torch.allclose(got, expected, atol=1e-5)


def test_unsupported_heads_are_not_packed():
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, num_labels=1)
    assert packing.head_kind(RobertaForSequenceClassification(cfg)) is None
