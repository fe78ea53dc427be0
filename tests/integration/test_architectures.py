"""Users' own reward-model architectures beyond the Llama and BERT families our invariant forward covers: what
their attention does is applied (a sliding window, soft-capped logits: transformers' padded forward, never our
packed attention, which has neither), models transformers loads only with eager attention load, a RoBERTa's
position offset bounds its inputs, and a checkpoint that is no reward model is refused in one line. Each served
reward is checked against transformers' own forward of the same tokens, one input at a time, in fp32."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers as T

from rewardmodel.modeling import minilm_path
from rewardmodel.rendering import encode_input
from service.backends.hf_backend import HFBackend
from service.grouping import PlannedBatch
from tests.helpers import test_config

INPUTS = [{"prompt": "How do I boil an egg? " * n, "response": "Simmer it, then cool it in cold water. " * m}
          for n, m in ((1, 1), (3, 2), (8, 5), (1, 12))]


def _save(model, tok, folder):
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _decoder(kind: str, folder, tokenizer_dir, **extra):
    tok = T.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(0)
    config_cls, model_cls = {"mistral": (T.MistralConfig, T.MistralForSequenceClassification),
                             "qwen2": (T.Qwen2Config, T.Qwen2ForSequenceClassification),
                             "gemma2": (T.Gemma2Config, T.Gemma2ForSequenceClassification),
                             "llama": (T.LlamaConfig, T.LlamaForSequenceClassification)}[kind]
    config = config_cls(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
                        initializer_range=0.2, pad_token_id=tok.pad_token_id, **{"num_labels": 1, **extra})
    return _save(model_cls(config), tok, folder)


def _encoder(kind: str, folder, **extra):
    tok = T.AutoTokenizer.from_pretrained(str(minilm_path()))
    torch.manual_seed(0)
    config_cls, model_cls = {"deberta-v2": (T.DebertaV2Config, T.DebertaV2ForSequenceClassification),
                             "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification)}[kind]
    config = config_cls(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, initializer_range=0.2, num_labels=1, **extra)
    return _save(model_cls(config), tok, folder)


def _check_against_transformers(folder, **serve):
    backend = HFBackend(test_config(folder, **serve))
    rows = [encode_input(backend.tokenizer, inp, backend.max_length).input_ids for inp in INPUTS]
    served = backend.rewards(PlannedBatch(rows))
    reference = T.AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation="eager").eval()
    with torch.no_grad():
        expected = [float(reference(torch.tensor([r])).logits[0, 0]) for r in rows]
    assert max(abs(a - b) for a, b in zip(served, expected)) < 1e-4, (served, expected)
    assert max(map(len, rows)) > 64  # longer than the windows below: the window matters
    return backend


@pytest.mark.parametrize("kind,extra", [
    ("mistral", {"sliding_window": 16}),
    ("qwen2", {"sliding_window": 16, "use_sliding_window": True, "max_window_layers": 0}),
    ("gemma2", {"sliding_window": 16, "attn_logit_softcapping": 1.0, "head_dim": 8}),
])
def test_windowed_and_soft_capped_attention_is_applied(tmp_path, smollm2_tokenizer_dir, kind, extra):
    backend = _check_against_transformers(_decoder(kind, tmp_path / kind, smollm2_tokenizer_dir, **extra))
    assert backend.invariant is None and not backend.packed  # transformers' padded forward applies them


def test_packed_attention_never_drops_a_window(tmp_path, smollm2_tokenizer_dir):
    """Packing such a model is refused when asked for; and the packed attention itself fails loudly on a window
    a sequence exceeds (a safety net under the load-time check), never dropping it."""
    from service.backends import packing

    folder = _decoder("mistral", tmp_path / "m", smollm2_tokenizer_dir, sliding_window=16)
    with pytest.raises(ValueError, match="sliding attention window"):
        HFBackend(test_config(folder, packing="on", forward="transformers", warmup=False))
    with pytest.raises(RuntimeError, match="no sliding window"):
        packing._check_unsupported({"sliding_window": 16}, longest=17)
    packing._check_unsupported({"sliding_window": 16}, longest=16)  # a window no sequence exceeds changes nothing


def test_deberta_loads_with_eager_attention(tmp_path):
    _check_against_transformers(_encoder("deberta-v2", tmp_path / "deberta", max_position_embeddings=512,
                                         pad_token_id=0))


def test_roberta_inputs_fit_its_offset_positions(tmp_path):
    folder = _encoder("roberta", tmp_path / "roberta", max_position_embeddings=66, pad_token_id=1)
    backend = HFBackend(test_config(folder))  # warm-up included: it scored a longest input before
    assert backend.max_length == 64
    long = encode_input(backend.tokenizer, {"raw": "word " * 500}, backend.max_length)
    assert long.truncated and len(long.input_ids) == 64
    assert len(backend.rewards(PlannedBatch([long.input_ids]))) == 1


@pytest.mark.parametrize("labels,said", [(2, r"head does not have 1 output\(s\) \(saved with another num_labels"),
                                         (3, r"has num_labels=3; expected 1 \(a reward model has 1\)")])
def test_a_checkpoint_with_other_labels_is_refused_in_one_line(tmp_path, smollm2_tokenizer_dir, labels, said):
    folder = _decoder("llama", tmp_path / "labels", smollm2_tokenizer_dir, num_labels=labels)
    with pytest.raises(ValueError, match=said):
        HFBackend(test_config(folder))


def test_a_base_model_without_a_head_is_refused(tmp_path, tiny_llama_lm_dir):
    """A causal LM's checkpoint would get a random score head: meaningless rewards, so it is not served."""
    with pytest.raises(ValueError, match="is not a reward model: its checkpoint has no trained head"):
        HFBackend(test_config(tiny_llama_lm_dir))


def test_compile_on_says_what_it_does_not_compile(tmp_path, smollm2_tokenizer_dir, caplog):
    folder = _decoder("gemma2", tmp_path / "g", smollm2_tokenizer_dir, head_dim=8)
    with caplog.at_level(logging.WARNING, logger="rewardserve.hf"):
        backend = HFBackend(test_config(folder, compile="on", warmup=False))
    assert backend.describe()["compiled"] is False and "--compile on" in caplog.text
