"""bench/heads.py's K-head overlay: row 0 is the default's head, K rows, served as K heads over the default's base."""

import torch
from safetensors.torch import load_file

from bench.heads import write_overlay
from rewardmodel.modeling import OVERLAY_TENSORS, default_model_dir, resolve_model


def test_a_k_head_overlay_over_the_defaults_base(tmp_path):
    folder = write_overlay(tmp_path / "o", 4)
    rows = load_file(str(folder / OVERLAY_TENSORS))["score.weight"]
    default = load_file(str(default_model_dir() / OVERLAY_TENSORS))["score.weight"]
    assert rows.shape == (4, default.shape[1]) and torch.equal(rows[0], default[0].float())
    source = resolve_model(str(folder))
    assert source.head_count == 4 and source.backbone_key() == resolve_model("default").backbone_key()


def test_the_layers_configuration_reads_one_layer_per_head(tmp_path):
    source = resolve_model(str(write_overlay(tmp_path / "o", 3, [30, 8, 16])))
    assert source.head_layers == (30, 8, 16) and source.heads == ("h0", "h1", "h2")
    assert source.backbone_key() == resolve_model("default").backbone_key()  # still one pass with the default
