"""Reading overlays back: an overlay folder's metadata, its score rows (one per head) with the frozen base they
read, and the rewards of those rows on preference pairs through the feature store. Used by the multi-head tools
(training/heads.py, training/head_overlays.py), the length fit CLI and the heads report; imports none of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch


def overlay_meta(folder: Path) -> dict[str, Any]:
    from rewardmodel.modeling import OVERLAY_META

    return json.loads((Path(folder) / OVERLAY_META).read_text())


def overlay_rows(folder: Path, load_base: bool = False) -> tuple[list[str], torch.Tensor, Any]:
    """(head names, score.weight (K, H), the frozen base or None) of an overlay over a packaged decoder base.

    A single-head overlay's one head is named after its folder. With load_base, the base is loaded as the overlay
    says (base, max_length, num_hidden_layers; the layers its heads read) and its weights digest must equal the
    overlay's base_sha256.
    """
    from safetensors.torch import load_file

    from rewardmodel.modeling import OVERLAY_TENSORS

    folder = Path(folder)
    meta = overlay_meta(folder)
    weights = load_file(str(folder / OVERLAY_TENSORS))["score.weight"].float()  # (K, H)
    names = list(meta.get("heads") or [folder.resolve().name])
    if len(names) != weights.shape[0]:
        raise ValueError(f"{folder}: {len(names)} head names for {weights.shape[0]} rows of score.weight")
    frozen = None
    if load_base:
        from training.frozen import load_frozen

        frozen = load_frozen(meta["base"], meta.get("max_length"), meta.get("num_hidden_layers"),
                             read_layers_of(meta))
        if frozen.store_key["base_sha256"] != meta["base_sha256"]:
            raise ValueError(f"{folder} was trained over other base weights than the installed {meta['base']}")
    return names, weights, frozen


def read_layers_of(meta: dict[str, Any]) -> list[int] | None:
    """The layers an overlay's features are read at: its `read_layers` (train rm --read-layers), else the distinct
    layers of its `head_layers`; None where every head reads the last layer."""
    return meta.get("read_layers") or sorted(set(meta.get("head_layers") or [])) or None


def loaded_layers(meta: dict[str, Any]) -> int:
    """How many decoder layers a served overlay's backbone runs: its num_hidden_layers, else its base's."""
    if meta.get("num_hidden_layers"):
        return int(meta["num_hidden_layers"])
    from transformers import AutoConfig

    from rewardmodel.modeling import resolve_model

    base = resolve_model(meta["base"])
    kwargs = {"gguf_file": base.gguf_file} if base.gguf_file else {}
    return int(AutoConfig.from_pretrained(str(base.path), **kwargs).num_hidden_layers)


def pair_rewards(frozen: Any, records: Sequence[Mapping[str, Any]], weights: torch.Tensor,
                 store_path: str | None, layers: Sequence[int] | None = None) -> torch.Tensor:
    """(K, P, 2) rewards of K heads (K, H) on the records' pairs, features from (and added to) the store; layers:
    the layer each head reads (an overlay's head_layers) where the frozen base reads several."""
    from training.data import parse_record
    from training.features import FeatureStore, pair_features
    from training.frozen import layer_part

    store = FeatureStore.open(store_path, frozen.store_key)
    feats = pair_features(frozen.head, frozen.collate, [parse_record(r) for r in records], store)  # (P, 2, L*H)
    reads = frozen.head.read_layers or ()
    if not reads:
        return torch.einsum("pch,kh->kpc", feats, weights)
    if layers is None or len(layers) != weights.shape[0]:
        raise ValueError("the base reads several layers: name the layer of each head (its head_layers)")
    return torch.stack([layer_part(feats, reads, k) @ w for k, w in zip(layers, weights)])
