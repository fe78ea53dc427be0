"""The shipped overlays agree with each other: models/helpful and models/ensemble over models/default's base."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

MODELS = Path(__file__).resolve().parents[2] / "models"
LENGTH_KEYS = {"slope", "mean_tokens", "r_before", "r_after", "unit", "fit_on"}

pytestmark = pytest.mark.skipif(not (MODELS / "helpful" / "rewardserve_overlay.json").exists(),
                                reason="no shipped helpful head")


def _meta(name: str) -> dict:
    return json.loads((MODELS / name / "rewardserve_overlay.json").read_text())


def _stats(name: str) -> dict:
    return json.loads((MODELS / name / "reward_stats.json").read_text())


def _rows(name: str) -> torch.Tensor:
    return load_file(str(MODELS / name / "overlay.safetensors"))["score.weight"]


def _check_length(block: dict) -> None:
    assert LENGTH_KEYS <= set(block) and block["unit"] == "response_tokens"
    assert all(isinstance(block[k], float) for k in ("slope", "mean_tokens", "r_before", "r_after"))
    assert abs(block["r_after"]) < 1e-6 and block["mean_tokens"] > 0


def test_every_shipped_overlay_is_over_the_defaults_base_and_token_cap() -> None:
    default = _meta("default")
    for name in ("helpful", "ensemble"):
        meta = _meta(name)
        assert meta["base"] == "smollm2" and meta["base_sha256"] == default["base_sha256"]
        assert meta["max_length"] == default["max_length"] == 512 and not meta.get("num_hidden_layers")
        assert "--head-only" in meta["trained_with"]


def test_the_default_keeps_the_single_head_format_with_a_length_block() -> None:
    assert "heads" not in _meta("default") and _rows("default").shape == (1, 576)
    stats = _stats("default")
    assert "heads" not in stats and stats["std"] > 0 and stats["max_length"] == 512
    _check_length(stats["length"])
    assert (stats["mean"], stats["std"], stats["split"], stats["rewards"]) == (  # the keys it shipped with
        0.1444859355688095, 0.6932157278060913, "eval", 800)
    assert stats["length"]["fit_on"].endswith("hh_harmless/dev.jsonl.gz")


def test_helpful_is_one_head_per_layer_served_as_their_normalized_mean() -> None:
    meta = _meta("helpful")
    layers = meta["read_layers"]
    assert layers == sorted(layers) and len(layers) >= 2 and layers[-1] == 30  # the base's last layer among them
    assert meta["heads"] == [f"L{k}" for k in layers] and meta["head_layers"] == layers
    assert meta["ensemble"] == {"combine": "mean", "normalize": True, "members": meta["heads"]}
    assert _rows("helpful").shape == (len(layers), 576) and "--read-layers" in meta["trained_with"]
    stats = _stats("helpful")["heads"]
    assert list(stats) == meta["heads"]
    for entry in stats.values():
        assert entry["std"] > 0 and entry["max_length"] == 512 and entry["length"]["fit_on"].endswith(
            "helpful/dev.jsonl.gz")
        _check_length(entry["length"])


def test_the_ensemble_names_its_rows_and_copies_the_included_heads_exactly() -> None:
    meta = _meta("ensemble")
    heads, rows = meta["heads"], _rows("ensemble")
    assert rows.shape == (len(heads), 576) and rows.dtype == torch.float32 and len(set(heads)) == len(heads)
    assert heads[:2] == ["harmless", "safety"] and torch.equal(rows[0], _rows("default")[0])
    layers = dict(zip(heads, meta["head_layers"]))
    assert layers["harmless"] == layers["safety"] == 30  # both read the last layer, as models/default does
    helpful = _meta("helpful")
    for name, row, k in zip(helpful["heads"], _rows("helpful"), helpful["head_layers"]):
        assert torch.equal(rows[heads.index(name)], row) and layers[name] == k  # copied bit for bit, same layer
    boots = [h for h in heads if "boot" in h]
    assert len(boots) >= 4 and {layers[h] for h in boots} == set(helpful["head_layers"])
    for a in range(len(heads)):
        assert not any(torch.equal(rows[a], rows[b]) for b in range(len(heads)) if b != a)
    stats = _stats("ensemble")
    assert list(stats) == ["heads"] and list(stats["heads"]) == heads
    for entry in stats["heads"].values():
        assert entry["std"] > 0 and entry["max_length"] == 512
        _check_length(entry["length"])


def test_the_ensemble_is_routed_by_the_shipped_safety_gate() -> None:
    gate = _meta("safety-gate")
    assert gate["base_sha256"] == _meta("default")["base_sha256"] and gate["max_length"] == 512
    assert gate["gate"]["reads"] == "prompt" and "train gate" in gate["trained_with"]
    assert gate["gate"]["metrics"]["eval_positive_accuracy"] > 0.95  # HH dev prompts routed
    block = _meta("ensemble")["ensemble"]
    heads = _meta("ensemble")["heads"]
    assert block["gate"] == {"head": "safety", "threshold": gate["gate"]["threshold"], "members": ["harmless"],
                             "reads": "prompt"}
    assert block["normalize"] is True and block["combine"] == "mean"
    assert sorted(block["members"]) == sorted(h for h in heads if h not in ("safety", "harmless"))
    assert torch.equal(_rows("ensemble")[heads.index("safety")], _rows("safety-gate")[0])
