"""Several linear reward heads over one frozen decoder base: fits, bootstrap resamples, multi-head overlays, stats.

A decoder head is r(x) = w . x with x the last real token's final hidden state (fp32) and no bias, so K heads are a
(K, H) matrix W and one forward pass gives every head's reward: features @ W.T. The overlay format (agreed with the
server's loader, rewardmodel/modeling.py):

- one head: exactly the single-head format (`score.weight` (1, H), no "heads" key in rewardserve_overlay.json,
  reward_stats.json {"mean", "std", ..., "length": {...}});
- K > 1 heads: rewardserve_overlay.json gains "heads": [name_0, ..., name_{K-1}] and overlay.safetensors holds
  `score.weight` (K, H) with its rows in that order; reward_stats.json is {"heads": {name: {"mean", "std", ...,
  "length": {...}}}}, every head's statistics measured on the same eval pairs;
- heads fit on several layers (`--read-layers`, features of each layer through the final norm): "head_layers":
  [k_0, ..., k_{K-1}] says how many decoder layers each row reads (rewardmodel/modeling.py serves them in one pass).

Bootstrap heads (`--bootstrap K`) are each fit by the same L2 solve on a resample, with replacement, of the training
pairs (seed + k); with several training files each file is resampled on its own (stratified), so every head sees
each source in its original proportion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from training.losses import bradley_terry_loss

log = logging.getLogger("rewardserve.train.heads")


@dataclass
class FittedHead:
    name: str
    weight: torch.Tensor  # (H,) fp32
    settings: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    layer: int | None = None  # the decoder layers it reads (None: all the frozen base's: its last layer)


def solve_l2(train: torch.Tensor, l2: float, max_iter: int = 500) -> torch.Tensor:
    """w (H,) fp32 minimising mean(-log sigmoid(w.(x_c - x_r))) + l2 |w * s|^2 over (P, 2, H) training features.

    Features are scaled by their per-dimension std s on the training rows before the penalty (so it treats every
    dimension alike) and the scale is folded back into w. The mean cancels in x_c - x_r. Solved with L-BFGS.
    """
    scale = train.flatten(0, 1).std(0) + 1e-6  # (H,)
    diffs = ((train[:, 0] - train[:, 1]) / scale).double()  # (P, H)
    w = torch.zeros(diffs.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(diffs @ w).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (w.detach() / scale.double()).float()  # (H,)


def pair_metrics(feats: torch.Tensor, weight: torch.Tensor) -> dict[str, float]:
    """Bradley-Terry loss, accuracy (ties wrong) and reward mean/std of a head on (P, 2, H) pair features."""
    r = feats @ weight  # (P, 2)
    loss, metrics = bradley_terry_loss(r[:, 0], r[:, 1])
    return {"loss": float(loss), "accuracy": float(metrics["accuracy"]), "reward_mean": float(r.mean()),
            "reward_std": float(r.std(unbiased=False))}


def bootstrap_index(sizes: Sequence[int], seed: int) -> torch.Tensor:
    """Indices into the concatenation of blocks of these sizes: each block resampled with replacement on its own."""
    gen = torch.Generator().manual_seed(seed)
    parts, start = [], 0
    for n in sizes:
        parts.append(start + torch.randint(0, n, (n,), generator=gen))
        start += n
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


def _l2_name(l2: float) -> str:
    return f"l2_{l2:g}"


def fit_heads(train: torch.Tensor, dev: torch.Tensor | None, *, l2s: Sequence[float], bootstrap: int = 0,
              seed: int = 42, sizes: Sequence[int] | None = None) -> list[FittedHead]:
    """One head per l2 (on all pairs), or with bootstrap K > 0, K heads per l2 on stratified resamples."""
    sizes = list(sizes or [train.shape[0]])
    heads = []
    for l2 in l2s:
        for k in range(bootstrap) if bootstrap else [None]:
            if k is None:
                name, data, settings = _l2_name(l2), train, {"l2": l2}
            else:
                name = f"boot{k}" if len(l2s) == 1 else f"{_l2_name(l2)}_boot{k}"
                data = train[bootstrap_index(sizes, seed + k)]
                settings = {"l2": l2, "bootstrap_seed": seed + k, "resample_sizes": sizes}
            w = solve_l2(data, l2)
            metrics = {f"train/{m}": v for m, v in pair_metrics(train, w).items()}
            if dev is not None:
                metrics |= {f"eval/{m}": v for m, v in pair_metrics(dev, w).items()}
            heads.append(FittedHead(name, w, settings, metrics))
            log.info("head %s: %s", name, {m: round(v, 4) for m, v in metrics.items() if m.endswith("accuracy")})
    return heads


def pick_best(heads: Sequence[FittedHead]) -> FittedHead:
    """The head with the best eval accuracy (ties: lower eval loss)."""
    return max(heads, key=lambda h: (h.metrics["eval/accuracy"], -h.metrics["eval/loss"]))


def clustered_se(correct: torch.Tensor, groups: torch.Tensor, draws: int = 2000, seed: int = 0) -> float:
    """Bootstrap standard error of mean(correct) resampling whole groups (pairs of one prompt move together)."""
    ids = torch.unique(groups)
    members = [torch.nonzero(groups == g).flatten() for g in ids]
    gen = torch.Generator().manual_seed(seed)
    means = []
    for _ in range(draws):
        pick = torch.randint(0, len(ids), (len(ids),), generator=gen).tolist()
        means.append(float(correct[torch.cat([members[i] for i in pick])].double().mean()))
    return float(torch.tensor(means).std())


def pick_one_se(heads: Sequence[FittedHead], dev: torch.Tensor, groups: torch.Tensor) -> tuple[FittedHead, float]:
    """The one-standard-error rule (Hastie, Tibshirani & Friedman, ESL 7.10): among heads whose eval accuracy is
    within one prompt-clustered bootstrap SE of the best, the most regularised (largest l2). Returns (head, SE)."""
    best = pick_best(heads)
    r = dev @ best.weight  # (P, 2)
    se = clustered_se(r[:, 0] > r[:, 1], groups)
    close = [h for h in heads if h.metrics["eval/accuracy"] >= best.metrics["eval/accuracy"] - se]
    return max(close, key=lambda h: h.settings["l2"]), se


def head_stats(weight: torch.Tensor, feats: torch.Tensor, tokens: torch.Tensor | None, *, fit_on: str,
               max_length: int) -> dict[str, Any]:
    """One head's reward_stats entry: mean/std of its rewards on (P, 2, H) eval features, plus the length fit."""
    from training.length_debias import fit_length

    r = feats @ weight  # (P, 2)
    stats: dict[str, Any] = {"mean": float(r.mean()), "std": float(r.std(unbiased=False)), "split": "eval",
                             "rewards": r.numel(), "max_length": max_length}
    if tokens is not None:
        stats["length"] = fit_length(r, tokens, fit_on)
    return stats


def write_tensors(out: Path, weights: torch.Tensor) -> None:
    """overlay.safetensors with score.weight (K, H), written atomically."""
    from safetensors.torch import save_file

    from rewardmodel.modeling import OVERLAY_TENSORS

    tmp = out / (OVERLAY_TENSORS + ".tmp")
    save_file({"score.weight": weights.detach().float().contiguous()}, str(tmp))
    tmp.chmod(0o644)
    tmp.replace(out / OVERLAY_TENSORS)
