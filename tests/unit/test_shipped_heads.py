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


def test_single_head_overlays_keep_the_single_head_format_with_a_length_block() -> None:
    for name in ("default", "helpful"):
        assert "heads" not in _meta(name) and _rows(name).shape == (1, 576)
        stats = _stats(name)
        assert "heads" not in stats and stats["std"] > 0 and stats["max_length"] == 512
        _check_length(stats["length"])
    default = _stats("default")  # the keys it shipped with are unchanged
    assert (default["mean"], default["std"], default["split"], default["rewards"]) == (
        0.1444859355688095, 0.6932157278060913, "eval", 800)
    assert default["length"]["fit_on"].endswith("hh_harmless/dev.jsonl.gz")
    assert _stats("helpful")["length"]["fit_on"].endswith("helpful/dev.jsonl.gz")


def test_the_ensemble_names_its_rows_and_copies_the_single_heads_exactly() -> None:
    heads = _meta("ensemble")["heads"]
    rows = _rows("ensemble")
    assert rows.shape == (len(heads), 576) and rows.dtype == torch.float32 and len(set(heads)) == len(heads)
    assert heads[:2] == ["harmless", "helpful"] and sum(h.startswith("boot") for h in heads) >= 4
    assert torch.equal(rows[0], _rows("default")[0]) and torch.equal(rows[1], _rows("helpful")[0])
    for a in range(2, len(heads)):
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
