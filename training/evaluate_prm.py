"""Process-reward-model evaluation on stepwise data -> report.json (`rewardserve eval prm`).

Step scores are read as the server reads them: every example encoded by `rewardmodel.steps.encode_steps` with the
checkpoint's own separator, a plain token-classification forward, `step_scores` at the step ends. A step is predicted
good when its raw score is above the threshold (0: the log-odds of a good step are positive).

report.json:
  steps.accuracy          fraction of steps whose prediction matches the label (also per class: good, bad)
  steps.auroc             threshold-free: how often a good step outscores a bad one (ties count half)
  steps.mean_score_good / mean_score_bad
  first_error             ProcessBench's measure. The reference first error of an example is the index of its first
                          bad step (-1 when every step is good); the prediction is the first step predicted bad (-1
                          when none is). accuracy_erroneous: exact matches on examples with an error; accuracy_correct:
                          matches (no error predicted) on the others; f1: their harmonic mean (0 when both are 0)
  baseline_all_good       the same measures for a PRM that calls every step good (its f1 is 0)
  baseline_position_auroc the steps.auroc of a scorer that sees only a step's relative position (later: lower)
  paired_first_error      on controlled pairs (a wrong solution and a correct one of the same prompt that agree
                          before its first error), how often the wrong one's first bad step scores lower (0.5: chance)
  examples, dropped, steps_dropped   what was scored (an example's trailing steps past max_length are not)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from training.prm_batch import StepCollator, encode_examples, load_stepwise, pad_id
from training.prm_loss import batch_step_scores
from training.prm_model import forward_logits, load_prm

log = logging.getLogger("rewardserve.eval.prm")


# ---------------------------------------------------------------------------------------------------- metrics


def first_error(good: Sequence[bool]) -> int:
    """Index of the first bad step, -1 when every step is good."""
    return next((i for i, g in enumerate(good) if not g), -1)


def auroc(good_scores: np.ndarray, bad_scores: np.ndarray) -> float | None:
    """P(a good step's score > a bad step's), ties counted half (Mann-Whitney U / (n_good n_bad))."""
    if not len(good_scores) or not len(bad_scores):
        return None
    both = np.concatenate([good_scores, bad_scores])
    order = np.argsort(both, kind="stable")
    ranks = np.empty(len(both))
    sorted_vals = both[order]
    start = 0
    while start < len(both):  # average ranks over runs of equal values
        end = start
        while end + 1 < len(both) and sorted_vals[end + 1] == sorted_vals[start]:
            end += 1
        ranks[order[start : end + 1]] = (start + end) / 2 + 1
        start = end + 1
    n_good, n_bad = len(good_scores), len(bad_scores)
    u = ranks[:n_good].sum() - n_good * (n_good + 1) / 2
    return float(u / (n_good * n_bad))


def _ratio(hits: int, total: int) -> float | None:
    return hits / total if total else None


def position_auroc(labels: Sequence[Sequence[bool]]) -> float | None:
    """The step AUROC of a scorer that knows only where a step is (score: minus its relative position): bad steps
    come late when a solution is wrong from its first error on, so this is the AUROC a PRM gets for free."""
    scores = np.array([-j / len(y) for y in labels for j in range(len(y))])
    flat = np.array([v for y in labels for v in y], dtype=bool)
    return auroc(scores[flat], scores[~flat])


def paired_first_error(examples: Sequence[Any], scores: Sequence[Sequence[float]]) -> dict:
    """Controlled pairs: a wrong solution whose first error is step j, and a correct solution of the same prompt with
    the same steps before j (sets made by changing one step, as training/prm_data.py's). `wrong_lower`: how often the
    wrong solution's step j scores below the correct one's step j, where the two differ only in that step's text
    (0.5 is chance): did the PRM notice the change itself, whatever it does with positions."""
    correct: dict[str, list[tuple[Any, Sequence[float]]]] = {}
    for ex, s in zip(examples, scores):
        if first_error(ex.labels[: len(s)]) < 0:
            correct.setdefault(ex.prompt, []).append((ex, s))
    lower, pairs = 0.0, 0
    for ex, s in zip(examples, scores):
        j = first_error(ex.labels[: len(s)])
        match = next((cs for c, cs in correct.get(ex.prompt, []) if j >= 0 and len(cs) > j and c.steps[:j] == ex.steps[:j]), None)
        if match is not None:
            pairs += 1
            lower += 1.0 if s[j] < match[j] else 0.5 if s[j] == match[j] else 0.0
    return {"pairs": pairs, "wrong_lower": lower / pairs if pairs else None}


def prm_metrics(scores: Sequence[Sequence[float]], labels: Sequence[Sequence[bool]], threshold: float = 0.0) -> dict:
    """Step accuracy and ProcessBench first-error accuracy/F1 (module doc) of per-example step scores."""
    if len(scores) != len(labels) or any(len(s) != len(y) for s, y in zip(scores, labels)):
        raise ValueError("scores and labels must have the same examples and steps")
    flat_s = np.array([v for s in scores for v in s], dtype=np.float64)
    flat_y = np.array([v for y in labels for v in y], dtype=bool)
    pred = flat_s > threshold
    erroneous = [(s, y) for s, y in zip(scores, labels) if first_error(y) >= 0]
    correct = [(s, y) for s, y in zip(scores, labels) if first_error(y) < 0]
    predicted = lambda s: first_error([v > threshold for v in s])  # noqa: E731
    acc_err = _ratio(sum(predicted(s) == first_error(y) for s, y in erroneous), len(erroneous))
    acc_ok = _ratio(sum(predicted(s) == -1 for s, _ in correct), len(correct))
    a, b = acc_err or 0.0, acc_ok or 0.0
    return {
        "steps": {
            "count": int(flat_y.size), "good": int(flat_y.sum()),
            "accuracy": _ratio(int((pred == flat_y).sum()), flat_y.size),
            "accuracy_good": _ratio(int((pred & flat_y).sum()), int(flat_y.sum())),
            "accuracy_bad": _ratio(int((~pred & ~flat_y).sum()), int((~flat_y).sum())),
            "auroc": auroc(flat_s[flat_y], flat_s[~flat_y]),
            "mean_score_good": float(flat_s[flat_y].mean()) if flat_y.any() else None,
            "mean_score_bad": float(flat_s[~flat_y].mean()) if (~flat_y).any() else None,
        },
        "first_error": {
            "erroneous": len(erroneous), "correct": len(correct), "accuracy_erroneous": acc_err,
            "accuracy_correct": acc_ok, "f1": 2 * a * b / (a + b) if a + b > 0 else 0.0,
        },
        "threshold": threshold,
    }


# ---------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_items(model: Any, tokenizer: Any, spec: Any, items: Sequence, batch_size: int = 16) -> list[list[float]]:
    """Per item, its raw step scores, in length-sorted batches (fp32 scores do not depend on batch company)."""
    collate = StepCollator(pad_id(tokenizer))
    out: list[list[float]] = [[] for _ in items]
    order = sorted(range(len(items)), key=lambda i: len(items[i].input_ids))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = collate([items[i] for i in idx])
        for i, s in zip(idx, batch_step_scores(forward_logits(model, batch), batch.step_mask, spec)):
            out[i] = s.tolist()
    return out


def eval_prm(model_spec: str, data: str, report_dir: str | None = None, max_length: int = 0, batch_size: int = 16,
             device: str = "cpu", limit: int | None = None, threshold: float = 0.0, num_layers: int | None = None) -> dict:
    """Score `data` with the PRM `model_spec`; the report (module doc), also written to report_dir/report.json."""
    model, tokenizer, spec, max_length = load_prm(model_spec, max_length, device, num_layers=num_layers)
    examples = load_stepwise(data)[:limit]
    if not examples:
        raise ValueError(f"{data} holds no stepwise examples")
    items = encode_examples(tokenizer, examples, max_length, spec.step_separator, what=str(data))
    scores = score_items(model, tokenizer, spec, items, batch_size)
    labels = [it.labels for it in items]
    report = {
        "model": str(model_spec), "data": str(data), "max_length": max_length, "separator": spec.step_separator,
        "examples": len(items), "dropped": len(examples) - len(items),
        "steps_dropped": sum(it.steps_dropped for it in items),
        **prm_metrics(scores, labels, threshold),
        "baseline_all_good": prm_metrics([[1.0] * len(y) for y in labels], labels, 0.0),
        "baseline_position_auroc": position_auroc(labels),
        "paired_first_error": paired_first_error([examples[it.index] for it in items], scores),
    }
    if report_dir:
        out = Path(report_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(args: Any) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = eval_prm(args.model, args.data, args.report, args.max_length, args.batch_size, device, args.limit,
                      args.threshold, args.num_layers)
    steps, fe = report["steps"], report["first_error"]
    auc = "n/a" if steps["auroc"] is None else f"{steps['auroc']:.4f}"
    print(f"{report['examples']} examples, {steps['count']} steps: step accuracy {steps['accuracy']:.4f} "
          f"(AUROC {auc}), first-error F1 {fe['f1']:.4f}; report in {Path(args.report) / 'report.json'}")
    return 0
