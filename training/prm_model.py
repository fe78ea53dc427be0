"""Process reward models as transformers token classifiers: loading a base to train, loading a PRM checkpoint, and
the module the training loop runs (its forward is the plain model forward, which is what a server runs too).

A PRM checkpoint is an `AutoModelForTokenClassification` folder with `rewardserve_prm.json` (rewardmodel/steps.py).
Bases are resolved like reward-model bases (`minilm`, `smollm2`, a folder; rewardmodel.modeling.resolve_model): the
smollm2 GGUF is dequantized to float weights on load; a folder's own head is replaced when its label count is not the
PRM's (e.g. a one-label reward model), and kept when it fits (continuing to train a PRM).
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from rewardmodel.modeling import ModelSource, load_tokenizer, resolve_model
from rewardmodel.rendering import model_max_length
from rewardmodel.steps import PRMSpec, load_prm_spec

log = logging.getLogger("rewardserve.train.prm")

LABELS = {0: "bad", 1: "good"}


class PRMModule(torch.nn.Module):
    """What the loop trains: (B, T) ids and mask -> (B, T, C) float32 token-classification logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # a transformers *ForTokenClassification (LoRA layers injected in place, if any)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).logits.float()


def label_names(spec: PRMSpec) -> dict[int, str]:
    if spec.num_labels == 1:
        return {0: "good"}
    return {spec.good_label: "good", 1 - spec.good_label: "bad"}


def load_base(source: ModelSource, spec: PRMSpec, seed: int, num_layers: int | None = None) -> Any:
    """A float32 `AutoModelForTokenClassification` over the base, with a seeded fresh head unless it already fits."""
    from transformers import AutoModelForTokenClassification

    from training.rm import drop_dequantized_gguf_marker

    if source.overlay is not None:
        raise ValueError(f"{source.overlay} is a reward-head overlay, not a base for a PRM: pass its base "
                         "(minilm, smollm2) or a checkpoint folder")
    names = label_names(spec)
    kwargs: dict[str, Any] = {"id2label": names, "label2id": {v: k for k, v in names.items()},  # num_labels from these
                              "dtype": torch.float32, "ignore_mismatched_sizes": True}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if num_layers:
        kwargs["num_hidden_layers"] = num_layers  # the layers past it are not loaded
    with torch.random.fork_rng(devices=[]):  # the head's init depends on the seed only, not on what ran before
        torch.manual_seed(seed)
        model = AutoModelForTokenClassification.from_pretrained(str(source.path), **kwargs)
    drop_dequantized_gguf_marker(model)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model


def load_prm(spec: str, max_length: int = 0, device: str = "cpu", seed: int = 0,
             num_layers: int | None = None) -> tuple[Any, Any, PRMSpec, int]:
    """(model in eval mode, tokenizer, PRMSpec, max_length) of a PRM checkpoint folder; for a plain base (minilm,
    smollm2, a folder without rewardserve_prm.json) a seeded UNTRAINED two-label head over its first `num_layers`
    layers (all by default), with a warning: a baseline."""
    from transformers import AutoModelForTokenClassification

    source = resolve_model(spec)
    prm_spec = load_prm_spec(source.path) if source.overlay is None else None
    tokenizer = load_tokenizer(source)
    if prm_spec is None:
        log.warning("%s is not a PRM checkpoint (no rewardserve_prm.json): its step head is UNTRAINED (seeded init)", spec)
        prm_spec = PRMSpec()
        model = load_base(source, prm_spec, seed, num_layers)
    else:
        model = AutoModelForTokenClassification.from_pretrained(str(source.path), dtype=torch.float32)
        if model.config.num_labels != prm_spec.num_labels:
            raise ValueError(f"{spec}: the head has {model.config.num_labels} labels, rewardserve_prm.json says "
                             f"{prm_spec.num_labels}")
    return model.to(device).eval(), tokenizer, prm_spec, model_max_length(tokenizer, model.config, max_length)


def freeze_base(model: Any) -> int:
    """Only the token-classification head (`score` or `classifier`) trains; returns its parameter count."""
    head = getattr(model, "score", None)
    if head is None:
        head = getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no score/classifier head to train alone")
    for p in model.parameters():
        p.requires_grad_(False)
    for p in head.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in head.parameters())


@torch.no_grad()
def forward_logits(model: Any, batch: Any) -> torch.Tensor:
    """(B, T, C) float32 logits of a plain transformers model on a StepBatch, on the model's device, back on CPU."""
    device = next(model.parameters()).device
    out = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device))
    return getattr(out, "logits", out).float().cpu()
