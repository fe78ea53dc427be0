"""`rewardserve train gate`: a linear gate over a frozen decoder base that tells two kinds of conversation apart, for
routing an ensemble (docs/training.md, "Routing by a learned gate").

Llama 2 combines its safety and helpfulness reward models by switching to the safety one where the prompt is
safety-relevant. The gate made here learns that switch from data: every sequence (chosen and rejected) of the
`--positive` preference files is one class (e.g. HH red-team dialogues), every sequence of the `--negative` files the
other (e.g. helpfulness prompts and answers). By default (`--reads prompt`, as Llama 2 switches on the prompt) it
reads each conversation with its response emptied (rewardmodel.rendering.prompt_only), so every response to a prompt
takes the same side; `--reads input` reads whole sequences. It reads the same feature as the reward heads (the last
real token's final hidden state, from the same feature store): served beside them it is one more row of the head
GEMM, and a prompt-reading gate costs one more (short) sequence per distinct prompt of a request.

Each distinct sequence counts once (the helpfulness data repeats its answers across pairs). The fit: class-balanced
logistic regression on standardized features with an L2 penalty on the standardized weights,
solved by L-BFGS; the penalty is chosen among `--l2` values by K-fold cross-validation grouped by prompt (the
balanced log loss; sequences of one prompt never straddle folds). The standardization and the intercept are folded
into one row w and a threshold t, so a served gate is `w·h > t` <=> P(positive) > 1/2. The export is a single-head
overlay whose raw reward is the gate's logit minus its intercept; its rewardserve_overlay.json records the threshold
(`gate.threshold`), which `train rm --gate` copies into a multi-head overlay's ensemble.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from training.checkpoint import atomic_write_text
from training.loop import flag_of

log = logging.getLogger("rewardserve.train.gate")

DEFAULT_L2 = (1e-3, 1e-2, 1e-1)
FOLDS = 5


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float) -> tuple[torch.Tensor, float]:
    """Class-balanced, L2-penalised logistic regression on standardized x: (w (H,), b) in the ORIGINAL feature
    units (standardization folded in), float64. y: 1 / 0."""
    x, y = x.double(), y.double()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd
    pos = float(y.mean())
    if pos in (0.0, 1.0):
        raise ValueError("the gate needs examples of both classes")
    weight = torch.where(y == 1, 0.5 / pos, 0.5 / (1 - pos))
    params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=500, tolerance_grad=1e-9, tolerance_change=1e-12,
                            line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = xs @ params[:-1] + params[-1]
        loss = (weight * torch.nn.functional.binary_cross_entropy_with_logits(z, y, reduction="none")).mean()
        loss = loss + 0.5 * l2 * (params[:-1] ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    ws, bs = params.detach()[:-1], float(params.detach()[-1])
    w = ws / sd
    return w, bs - float((w * mu).sum())


def balanced_log_loss(z: torch.Tensor, y: torch.Tensor) -> float:
    y = y.double()
    losses = torch.nn.functional.binary_cross_entropy_with_logits(z.double(), y, reduction="none")
    return 0.5 * float(losses[y == 1].mean()) + 0.5 * float(losses[y == 0].mean())


def balanced_accuracy(z: torch.Tensor, y: torch.Tensor) -> float:
    right = (z > 0) == (y == 1)
    return 0.5 * float(right[y == 1].double().mean()) + 0.5 * float(right[y == 0].double().mean())


def grouped_folds(groups: torch.Tensor, k: int, seed: int) -> list[torch.Tensor]:
    """k boolean masks (held-out rows), whole groups at a time, groups shuffled with the seed."""
    ids = torch.unique(groups)
    order = ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed))]
    fold_of = {int(g): i % k for i, g in enumerate(order)}
    assign = torch.tensor([fold_of[int(g)] for g in groups])
    return [assign == i for i in range(k)]


def pick_l2(x: torch.Tensor, y: torch.Tensor, groups: torch.Tensor, l2s: Sequence[float], *, folds: int = FOLDS,
            seed: int = 42) -> tuple[float, list[dict[str, float]]]:
    """The l2 with the lowest grouped-K-fold balanced log loss (ties: the larger l2), and every candidate's scores."""
    masks = grouped_folds(groups, min(folds, len(torch.unique(groups))), seed)
    table = []
    for l2 in l2s:
        z = torch.empty(len(y), dtype=torch.float64)
        for held in masks:
            w, b = fit_logistic(x[~held], y[~held], l2)
            z[held] = x[held].double() @ w + b
        table.append({"l2": l2, "cv_log_loss": balanced_log_loss(z, y), "cv_balanced_accuracy": balanced_accuracy(z, y)})
    best = min(table, key=lambda r: (round(r["cv_log_loss"], 6), -r["l2"]))
    return best["l2"], table


def read_items(files: Sequence[str], reads: str, flag: str = "--positive/--negative") -> list[Any]:
    """Preference pairs of the files; with reads="prompt" a file may also hold prompts alone (`{"prompt": str}` or
    `{"messages": [...]}` ending with the user's turn), returned as message lists."""
    from training.data import load_preferences, parse_records, require_object, require_records

    items: list[Any] = []
    for path in files:
        records = parse_records(path, require_object, "preference")  # objects only: a string record says so
        require_records(records, path, flag)  # a given file is never ignored
        if records and all("chosen" not in r and "rejected" not in r for r in records):
            if reads != "prompt":
                raise ValueError(f"{path} holds prompts alone: only a gate that reads the prompt can learn from it")
            for i, r in enumerate(records):
                if isinstance(r.get("prompt"), str) and r["prompt"]:
                    items.append([{"role": "user", "content": r["prompt"]}])
                elif isinstance(r.get("messages"), list) and r["messages"]:
                    items.append([dict(m) for m in r["messages"]])
                else:
                    raise ValueError(f"{path}: record {i} has neither chosen/rejected, a prompt nor messages")
            continue
        items += load_preferences(records)
    return items


def distinct_sequences(frozen: Any, pairs: Sequence[Any], store: Any,
                       reads: str = "prompt") -> tuple[torch.Tensor, torch.Tensor]:
    """The features of every distinct sequence the gate reads in the pairs (reads="prompt": each pair's prompt with
    the response emptied; "input": its chosen and rejected sequences), each once however many pairs repeat it,
    computed into the store where missing; and each one's prompt id."""
    from training.features import encode_distinct, encode_prompts, fill_store, sequence_key
    from training.rm_head import prompt_groups

    prompts = prompt_groups(pairs)
    if reads == "prompt":
        rows, index = encode_prompts(frozen.collate, pairs)
        index = index[:, None]
    else:
        rows, index = encode_distinct(frozen.collate, pairs)
    fill_store(frozen.head, store, rows, frozen.collate.pad_token_id)
    groups = torch.empty(len(rows), dtype=torch.long)
    for side in range(index.shape[1]):
        groups[index[:, side]] = prompts
    return store.lookup([sequence_key(r) for r in rows]), groups


def train_gate(args: Any, frozen: Any = None) -> dict[str, Any]:
    """args: `train gate`'s flags. frozen: a training.frozen.Frozen to use instead of loading --base (tests)."""
    from training.features import FeatureStore
    from training.frozen import load_frozen
    from training.rm_head import export_overlay

    started = time.time()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec = args.base or "smollm2"
    from training.loop import check_output_dir

    check_output_dir(args.output)  # an existing file: refused before anything is read or loaded
    # the data first: a wrong file is refused before the minutes a base model takes to load
    items = {role: read_items(files, args.reads, flag_of(role))
             for role, files in (("positive", args.positive), ("negative", args.negative))}
    held_items = {role: {path: read_items([path], args.reads, flag_of(role)) for path in getattr(args, role) or []}
                  for role in ("eval_positive", "eval_negative")}
    if frozen is None:
        if base_spec != "smollm2":
            raise ValueError("a gate is exported as an overlay over the packaged decoder base: use --base smollm2")
        frozen = load_frozen(base_spec, args.max_length)
    if frozen.head.kind != "decoder":
        raise ValueError("a gate is a linear row without bias over a decoder base: use --base smollm2")
    store = FeatureStore.open(args.feature_cache, frozen.store_key)
    out = Path(args.output)
    parts: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    offset = 0
    for role, files in (("positive", args.positive), ("negative", args.negative)):
        x, g = distinct_sequences(frozen, items[role], store, args.reads)
        g = g + offset
        offset = int(g.max()) + 1
        parts[role] = (x, g)
        log.info("gate: %s: %d sequences from %s", role, len(x), ", ".join(files))
    held_out = {role: {path: distinct_sequences(frozen, pairs, store, args.reads)[0] for path, pairs in paths.items()}
                for role, paths in held_items.items()}
    (xp, gp), (xn, gn) = parts["positive"], parts["negative"]
    x, groups = torch.cat([xp, xn]), torch.cat([gp, gn])
    y = torch.cat([torch.ones(len(xp)), torch.zeros(len(xn))])
    l2s = list(args.l2 or DEFAULT_L2)
    l2, table = pick_l2(x, y, groups, l2s, seed=args.seed) if len(l2s) > 1 else (l2s[0], [])
    w, b = fit_logistic(x, y, l2)
    metrics: dict[str, Any] = {"train_balanced_accuracy": balanced_accuracy(x.double() @ w + b, y)}
    for role, label in (("eval_positive", 1), ("eval_negative", 0)):
        if held_out[role]:  # overall and per file: which kind of conversation it gets wrong
            right = {path: ((xf.double() @ w + b) > 0) == bool(label) for path, xf in held_out[role].items()}
            metrics[f"{role}_accuracy"] = float(torch.cat(list(right.values())).double().mean())
            metrics[f"{role}_accuracy_by_file"] = {path: float(r.double().mean()) for path, r in right.items()}
    threshold = -b
    if not math.isfinite(threshold):
        raise RuntimeError("the gate fit diverged (non-finite intercept)")
    head = frozen.head
    with torch.no_grad():
        frozen.model.score.weight.copy_(w.to(frozen.model.score.weight.dtype)[None, :])
    command = getattr(args, "command_line", None)
    gate = {"threshold": threshold, "reads": args.reads, "positive": list(args.positive), "negative": list(args.negative), "l2": l2,
            "l2_candidates": table, "metrics": metrics}
    export_overlay(out, head, frozen.source, base_spec, {
        "trained_with": command, "max_length": frozen.max_length, "num_hidden_layers": None, "gate": gate})
    summary = {"mode": "gate", "base": base_spec, "max_length": frozen.max_length, **gate,
               "seconds": round(time.time() - started, 1), "command": command}
    atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
    log.info("gate: l2 %g, threshold %.4f, %s -> %s", l2, threshold, metrics, out)
    return summary


def main(args: Any) -> int:
    summary = train_gate(args)
    print(json.dumps({k: summary[k] for k in ("l2", "threshold", "metrics")}))
    return 0
