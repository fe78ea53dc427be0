"""`train rm --head-only --l2 ...`: fit linear heads, add rows of existing overlays, export one or many heads.

The formats are described in training/heads.py. One head in the end is written exactly as before (single-head
overlay, flat reward_stats.json); more than one is a multi-head overlay whose rows are checked, one at a time, against
the base model's own forward (rewardmodel.modeling.reward_forward) the way the server reads a decoder reward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rewardmodel.modeling import OVERLAY_META, OVERLAY_TENSORS, sha256_file
from rewardmodel.normalization import STATS_FILE
from training.checkpoint import atomic_write_text
from training.data import PreferencePair
from training.frozen import layer_part
from training.heads import FittedHead, fit_heads, head_stats, pair_metrics, pick_best, pick_one_se, write_tensors
from training.overlay_io import overlay_meta, overlay_rows

log = logging.getLogger("rewardserve.train.heads")


def included_head(spec: str, frozen: Any, train: torch.Tensor, dev: torch.Tensor | None) -> FittedHead:
    """"NAME=DIR": the row of DIR's overlay (its head NAME when DIR holds several), over the same base and length,
    reading the layer it reads there (which this run's features must hold: --read-layers)."""
    name, sep, folder = spec.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--include-head {spec!r}: expected NAME=DIR")
    meta = overlay_meta(Path(folder))
    want = {"base_sha256": frozen.store_key["base_sha256"], "max_length": frozen.max_length,
            "num_hidden_layers": frozen.store_key["num_layers"]}
    got = {k: meta.get(k) for k in want}
    if got != want:
        raise ValueError(f"--include-head {spec!r}: {folder} was trained with {got}, this run uses {want}")
    names, rows, _ = overlay_rows(Path(folder))
    index = 0 if len(names) == 1 else names.index(name) if name in names else None
    if index is None:
        raise ValueError(f"--include-head {spec!r}: {folder} has heads {names}, none named {name!r}")
    row = rows[index]
    loaded = int(frozen.model.config.num_hidden_layers)
    layer = int((meta.get("head_layers") or [loaded] * len(names))[index])
    reads = frozen.head.read_layers or ()
    if layer not in (reads or (loaded,)):
        raise ValueError(f"--include-head {spec!r}: that head reads layer {layer}; this run's features hold layers "
                         f"{list(reads or (loaded,))} (--read-layers)")
    train, dev = layer_part(train, reads, layer), layer_part(dev, reads, layer)
    metrics = {f"train/{m}": v for m, v in pair_metrics(train, row).items()}
    if dev is not None:
        metrics |= {f"eval/{m}": v for m, v in pair_metrics(dev, row).items()}
    return FittedHead(name, row.clone(), {"from": folder, "trained_with": meta.get("trained_with")}, metrics,
                      layer=layer if reads else None)


def parse_gate(spec: str, include_heads: Sequence[str]) -> dict[str, Any]:
    """"GATE=HEAD[,HEAD...]" -> {"head": GATE, "threshold": t, "members": [HEAD...]}: GATE must be an included head
    (NAME=DIR) whose overlay was written by `train gate` (its threshold is read from there)."""
    gate, sep, routed = spec.partition("=")
    heads = [h for h in routed.split(",") if h]
    if not sep or not gate or not heads:
        raise ValueError(f"--gate {spec!r}: expected GATE=HEAD[,HEAD...]")
    folders = {name: folder for name, _, folder in (s.partition("=") for s in include_heads)}
    if gate not in folders:
        raise ValueError(f"--gate {spec!r}: include the gate's overlay with --include-head {gate}=DIR")
    block = overlay_meta(Path(folders[gate])).get("gate")
    if not block or "threshold" not in block:
        raise ValueError(f"--gate {spec!r}: {folders[gate]} is not a gate (made by `rewardserve train gate`)")
    if gate in heads:
        raise ValueError(f"--gate {spec!r}: the gate cannot route to itself")
    return {"head": gate, "threshold": float(block["threshold"]), "members": heads,
            "reads": block.get("reads", "input")}


def ensemble_block(gate: dict[str, Any], names: Sequence[str]) -> dict[str, Any]:
    """The overlay's served ensemble: the routed heads where the gate fires, the mean of the rest elsewhere."""
    missing = [h for h in gate["members"] if h not in names]
    if missing:
        raise ValueError(f"--gate: no head named {missing[0]!r} (heads: {list(names)})")
    rest = [n for n in names if n != gate["head"] and n not in gate["members"]]
    if not rest:
        raise ValueError("--gate: every head is the gate or routed to; the ensemble needs heads for elsewhere")
    return {"combine": "mean", "normalize": True, "members": rest, "gate": gate}


def check_rows(frozen: Any, heads: Sequence[FittedHead], feats: torch.Tensor, pairs: Sequence[PreferencePair]) -> float:
    """Max |served - training-time| reward over every row on a few pairs: one pass of the base's forward with all
    the rows as its score head, each reading its layer as the server reads it (rewardmodel.modeling.head_layers)."""
    from rewardmodel.modeling import HEAD_LAYERS, reward_forward

    model, batch = frozen.model, frozen.collate(list(pairs))
    reads = frozen.head.read_layers or ()
    loaded = int(model.config.num_hidden_layers)
    layers = tuple(h.layer or loaded for h in heads)
    want = torch.stack([layer_part(feats, reads, h.layer).transpose(0, 1).flatten(0, 1) @ h.weight for h in heads],
                       1)  # (2K', heads): chosen..., rejected...
    score = model.score
    model.score = torch.nn.Linear(score.in_features, len(heads), bias=False)
    with torch.no_grad():
        model.score.weight.copy_(torch.stack([h.weight for h in heads]))
    if any(k != loaded for k in layers):
        setattr(model, HEAD_LAYERS, layers)
    try:
        with torch.no_grad():
            got = reward_forward(model, batch.input_ids, batch.attention_mask, heads=True)  # (2K', heads)
    finally:
        model.score = score
        if hasattr(model, HEAD_LAYERS):
            delattr(model, HEAD_LAYERS)
    worst = float((got - want).abs().max())
    if worst > 1e-3:
        raise RuntimeError(f"overlay check failed: served rewards differ from training-time ones by {worst:.3g}")
    return worst


def export_multi(out: Path, frozen: Any, heads: Sequence[FittedHead], stats_on: dict[str, Any],
                 meta: dict[str, Any]) -> None:
    """score.weight (K, H) + "heads" names + per-head stats; rewardserve_overlay.json goes last."""
    out.mkdir(parents=True, exist_ok=True)
    (out / OVERLAY_META).unlink(missing_ok=True)
    write_tensors(out, torch.stack([h.weight for h in heads]))
    reads = frozen.head.read_layers or ()
    per_head = {h.name: head_stats(h.weight, layer_part(stats_on["feats"], reads, h.layer), stats_on["tokens"],
                                   fit_on=stats_on["fit_on"], max_length=frozen.max_length) for h in heads}
    for entry in per_head.values():
        entry["split"] = stats_on["split"]
    atomic_write_text(out / STATS_FILE, json.dumps({"heads": per_head}, indent=2) + "\n")
    body = {"base": meta["base"], "base_sha256": sha256_file(frozen.source.weights_file()),
            "tensors": OVERLAY_TENSORS, "heads": [h.name for h in heads], **{k: v for k, v in meta.items()
                                                                              if k != "base"}}
    loaded = int(frozen.model.config.num_hidden_layers)
    layers = [h.layer or loaded for h in heads]
    if any(k != loaded for k in layers):
        body["head_layers"] = layers
    atomic_write_text(out / OVERLAY_META, json.dumps(body, indent=2) + "\n")


def _describe(h: FittedHead) -> dict[str, Any]:
    return {"name": h.name, **h.settings, "metrics": h.metrics}


def train_linear_heads(frozen: Any, out: Path, train: torch.Tensor, dev: torch.Tensor | None,
                       stats_on: dict[str, Any], *, l2s: Sequence[float], bootstrap: int, pick_l2: str | None,
                       sizes: Sequence[int], include_heads: Sequence[str], seed: int, common: dict[str, Any],
                       check_pairs: Sequence[PreferencePair], dev_groups: torch.Tensor | None = None,
                       finish_single: Callable[..., None] | None = None,
                       gate: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit, pick, include, export; returns the run summary (training_config.json).

    pick_l2: None (keep every head), "best" (best eval accuracy) or "one-se" (the most regularised head within one
    prompt-clustered SE of the best; dev_groups (P_eval,) gives each eval pair's prompt). One head left is exported
    by finish_single (training/rm_head.py's, which the trainer passes) as a single-head overlay. gate (parse_gate's):
    the multi-head overlay declares the routed ensemble it is served as."""
    if frozen.head.kind != "decoder":
        raise ValueError("--l2 fits a linear head without bias: it needs a decoder base (smollm2)")
    if pick_l2 and (dev is None or bootstrap):
        raise ValueError("--pick-l2 chooses on --eval among plain heads: it needs --eval and no --bootstrap")
    out.mkdir(parents=True, exist_ok=True)
    reads = frozen.head.read_layers or ()
    candidates: list[dict[str, Any]] | None = [] if pick_l2 else None
    picked: dict[str, Any] = {"rule": pick_l2} if pick_l2 else {}
    fitted: list[FittedHead] = []
    for layer in reads or (None,):  # with --read-layers: the same fit and pick on each layer's features
        tr, dv = layer_part(train, reads, layer), layer_part(dev, reads, layer)
        got = fit_heads(tr, dv, l2s=l2s, bootstrap=bootstrap, seed=seed, sizes=sizes)
        if candidates is not None:
            candidates += [_describe(h) | ({"layer": layer} if layer else {}) for h in got]
        if pick_l2 == "one-se":
            head, se = pick_one_se(got, dv, dev_groups)
            got = [head]
            if layer is None:
                picked["clustered_se"] = se
            else:
                picked.setdefault("clustered_se", {})[f"L{layer}"] = se
        elif pick_l2:
            got = [pick_best(got)]
        for h in got:
            if layer is not None:
                h.name, h.layer = (f"L{layer}" if len(got) == 1 and not bootstrap else f"L{layer}_{h.name}"), layer
                h.settings["layer"] = layer
        fitted += got
    heads = [included_head(spec, frozen, train, dev) for spec in include_heads] + fitted
    names = [h.name for h in heads]
    if len(set(names)) != len(names):
        raise ValueError(f"head names must be unique: {names}")
    summary = {**common, "solver": "lbfgs", "l2": l2s[0] if len(l2s) == 1 else l2s, "bootstrap": bootstrap or None,
               "heads": [_describe(h) for h in heads], "l2_candidates": candidates, "pick_l2": picked or None}
    metrics_rows = [{"head": h.name, **h.metrics} for h in heads]
    block = ensemble_block(gate, names) if gate else None
    if not block and len({h.layer for h in fitted}) > 1:  # heads over several layers: served as their normalized mean
        block = {"combine": "mean", "normalize": True, "members": [h.name for h in fitted]}
    if block:
        summary["ensemble"] = block
    if len(heads) == 1 and not reads:
        if gate:
            raise ValueError("--gate needs a multi-head overlay")
        with torch.no_grad():
            frozen.model.score.weight.copy_(heads[0].weight[None, :])
        summary |= {"l2": heads[0].settings.get("l2"), "best_epoch": None, "best_metrics": heads[0].metrics,
                    "epochs_run": None}
        atomic_write_text(out / "metrics.jsonl", json.dumps(heads[0].metrics) + "\n")
        if finish_single is None:
            raise ValueError("one head left: pass finish_single (training.rm_head.finish_single) to export it")
        finish_single(frozen, out, train, dev, stats_on, summary, check_pairs)
        return summary
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in metrics_rows))
    eval_acc = {h.name: h.metrics.get("eval/accuracy") for h in heads} if dev is not None else None
    export_multi(out, frozen, heads, stats_on, {"base": common["base"], "trained_with": common["command"],
                                                "max_length": frozen.max_length,
                                                "num_hidden_layers": common["num_hidden_layers"],
                                                **({"read_layers": list(reads)} if reads else {}),
                                                "eval_accuracy": eval_acc, **({"ensemble": block} if block else {})})
    summary["head"] = ["score.weight"]
    summary["export_check_max_abs_diff"] = check_rows(frozen, heads, stats_on["feats"][: len(check_pairs)],
                                                      check_pairs)
    log.info("head-only: %d heads %s", len(heads), names)
    return summary
