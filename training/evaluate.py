"""Reward-model evaluation on preference pairs -> report.json, PNG plots and one self-contained report.html.

Scores are read exactly as the server reads them (encode_input ids, reward_forward), in length-sorted batches
(fp32 rewards do not depend on batch company, see ARCHITECTURE "Contracts").

report.json:
  accuracy            fraction of pairs with r_chosen > r_rejected (strict: a tie is wrong)
  ties                fraction with r_chosen == r_rejected
  reward_chosen / reward_rejected   mean, std, min, max
  margin_mean         mean (r_chosen - r_rejected)
  length              Pearson r of reward vs response token length over all 2N responses, mean lengths, and
                      longer_wins: how often the longer response of a pair got the higher reward (length bias)
  calibration         the BT probability as a confidence: p = sigmoid(|r_c - r_r|) in [0.5, 1], binned; per bin
                      the mean p and the observed accuracy (how often the favoured response was the chosen one);
                      ece = sum_bins (n_bin / N) |accuracy - mean p|
  truncated           fraction of rows cut to max_length
"""

from __future__ import annotations

import base64
import html
import json
import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from rewardmodel.modeling import load_reward_model, load_tokenizer, resolve_model, reward_forward
from rewardmodel.rendering import model_max_length
from training.data import PreferenceCollator, PreferencePair, load_preferences, pad_right

log = logging.getLogger("rewardserve.eval")

PLOTS = ("reward_hist.png", "reward_vs_length.png", "calibration.png")


# ---------------------------------------------------------------------------------------------------- scoring


@torch.no_grad()
def score_pairs(model: Any, tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int, batch_size: int = 16) -> dict:
    """Rewards of every chosen and rejected response: {"chosen": (N,), "rejected": (N,), "truncated": (2N,)}."""
    collator = PreferenceCollator(tokenizer, max_length)
    encoded = [collator.encode(p) for p in pairs]
    rows = [c for c, _ in encoded] + [r for _, r in encoded]  # (2N,): chosen first, then rejected
    rewards = np.zeros(len(rows), dtype=np.float64)
    order = sorted(range(len(rows)), key=lambda i: rows[i].tokens)  # similar lengths together: less padding
    device = next(model.parameters()).device
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        ids, mask = pad_right([rows[i].input_ids for i in idx], collator.pad_token_id)  # (b, T), (b, T)
        rewards[idx] = reward_forward(model, ids.to(device), mask.to(device)).double().cpu().numpy()  # (b,)
    n = len(pairs)
    truncated = np.array([e.truncated for e in rows], dtype=bool)
    return {"chosen": rewards[:n], "rejected": rewards[n:], "truncated": truncated}


def response_tokens(tokenizer: Any, pairs: Sequence[PreferencePair]) -> tuple[np.ndarray, np.ndarray]:
    """Token length of each response (the completion messages' text, no special tokens): (N,), (N,)."""

    def length(messages: list[dict]) -> int:
        return sum(len(tokenizer(m["content"], add_special_tokens=False)["input_ids"]) for m in messages)

    return np.array([length(p.chosen) for p in pairs]), np.array([length(p.rejected) for p in pairs])


# ---------------------------------------------------------------------------------------------------- metrics


def _describe(x: np.ndarray) -> dict[str, float]:
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max())}


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return None
    return float(np.corrcoef(x, y)[0, 1])


def calibration(chosen: np.ndarray, rejected: np.ndarray, bins: int = 10) -> dict:
    """Confidence p = sigmoid(|gap|) in [0.5, 1] vs how often the favoured response was the chosen one."""
    gap = chosen - rejected
    confidence = 1.0 / (1.0 + np.exp(-np.abs(gap)))  # (N,)
    correct = gap > 0  # (N,) strict: a tie (p = 0.5) favours neither, so it counts as wrong
    edges = np.linspace(0.5, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table, ece = [], 0.0
    for b in range(bins):
        sel = which == b
        count = int(sel.sum())
        row = {"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": count, "mean_confidence": None, "accuracy": None}
        if count:
            row["mean_confidence"], row["accuracy"] = float(confidence[sel].mean()), float(correct[sel].mean())
            ece += count / len(gap) * abs(row["accuracy"] - row["mean_confidence"])
        table.append(row)
    return {"bins": table, "ece": ece}


def build_report(scores: dict, len_chosen: np.ndarray, len_rejected: np.ndarray, bins: int = 10) -> dict:
    chosen, rejected = scores["chosen"], scores["rejected"]
    rewards, lengths = np.concatenate([chosen, rejected]), np.concatenate([len_chosen, len_rejected])  # (2N,)
    unequal = len_chosen != len_rejected
    longer_higher = np.where(len_chosen > len_rejected, chosen > rejected, rejected > chosen)
    return {
        "pairs": int(len(chosen)),
        "accuracy": float((chosen > rejected).mean()),
        "ties": float((chosen == rejected).mean()),
        "reward_chosen": _describe(chosen),
        "reward_rejected": _describe(rejected),
        "margin_mean": float((chosen - rejected).mean()),
        "length": {
            "pearson_reward_vs_tokens": pearson(lengths.astype(float), rewards),
            "mean_tokens_chosen": float(len_chosen.mean()),
            "mean_tokens_rejected": float(len_rejected.mean()),
            "longer_wins": float(longer_higher[unequal].mean()) if unequal.any() else None,
        },
        "calibration": calibration(chosen, rejected, bins),
        "truncated": float(scores["truncated"].mean()),
    }


# ------------------------------------------------------------------------------------------------------ plots


def write_plots(scores: dict, len_chosen: np.ndarray, len_rejected: np.ndarray, report: dict, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen, rejected = scores["chosen"], scores["rejected"]
    paths = [out / name for name in PLOTS]

    fig, ax = plt.subplots(figsize=(6, 4))
    edges = np.histogram_bin_edges(np.concatenate([chosen, rejected]), bins=40)
    ax.hist(chosen, bins=edges, alpha=0.6, label="chosen")
    ax.hist(rejected, bins=edges, alpha=0.6, label="rejected")
    ax.set(xlabel="reward", ylabel="responses", title=f"Rewards (accuracy {report['accuracy']:.3f})")
    ax.legend()
    fig.tight_layout(), fig.savefig(paths[0], dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(len_chosen, chosen, s=8, alpha=0.5, label="chosen")
    ax.scatter(len_rejected, rejected, s=8, alpha=0.5, label="rejected")
    r = report["length"]["pearson_reward_vs_tokens"]
    ax.set(xlabel="response tokens", ylabel="reward", title=f"Reward vs length (Pearson r = {r if r is None else round(r, 3)})")
    ax.legend()
    fig.tight_layout(), fig.savefig(paths[1], dpi=100), plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 5))
    rows = [b for b in report["calibration"]["bins"] if b["count"]]
    ax.plot([0.5, 1.0], [0.5, 1.0], "--", color="gray", label="perfect")
    ax.plot([b["mean_confidence"] for b in rows], [b["accuracy"] for b in rows], "o-", label="model")
    ax.set(xlim=(0.5, 1.0), ylim=(0.0, 1.0), xlabel="sigmoid(|r_c - r_r|)", ylabel="observed accuracy",
           title=f"Calibration (ECE {report['calibration']['ece']:.3f})")
    ax.legend()
    fig.tight_layout(), fig.savefig(paths[2], dpi=100), plt.close(fig)
    return paths


def write_html(report: dict, plots: list[Path], path: Path) -> None:
    """One file: the headline numbers, the calibration table, and the plots as base64 PNGs."""
    fmt = lambda v: "–" if v is None else (f"{v:.4f}" if isinstance(v, float) else html.escape(str(v)))  # noqa: E731
    head = {
        "model": report.get("model"), "data": report.get("data"), "pairs": report["pairs"],
        "accuracy": report["accuracy"], "ties": report["ties"], "margin mean": report["margin_mean"],
        "reward chosen mean / std": f"{report['reward_chosen']['mean']:.4f} / {report['reward_chosen']['std']:.4f}",
        "reward rejected mean / std": f"{report['reward_rejected']['mean']:.4f} / {report['reward_rejected']['std']:.4f}",
        "Pearson r (reward, tokens)": report["length"]["pearson_reward_vs_tokens"],
        "longer response wins": report["length"]["longer_wins"], "ECE": report["calibration"]["ece"],
        "truncated rows": report["truncated"],
    }
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{fmt(v)}</td></tr>" for k, v in head.items())
    cal = "".join(
        f"<tr><td>{b['lo']:.2f}–{b['hi']:.2f}</td><td>{b['count']}</td><td>{fmt(b['mean_confidence'])}</td>"
        f"<td>{fmt(b['accuracy'])}</td></tr>" for b in report["calibration"]["bins"]
    )
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"<figcaption>{p.stem}</figcaption></figure>" for p in plots
    )
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Reward model report</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin-bottom:1.5em}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:left}figure{display:inline-block;margin:0 1em}</style>"
        f"</head><body><h1>Reward model report</h1><table>{rows}</table><h2>Calibration</h2>"
        "<table><tr><th>confidence bin</th><th>pairs</th><th>mean confidence</th><th>accuracy</th></tr>"
        f"{cal}</table><h2>Plots</h2>{images}</body></html>\n",
        encoding="utf-8",
    )


# ------------------------------------------------------------------------------------------------- entry points


def eval_rm(model_dir: str, data: str, report_dir: str, max_length: int = 0, batch_size: int = 16,
            device: str = "cpu") -> dict:
    """Score `data` with the model in `model_dir`; write report.json, the plots and report.html to `report_dir`."""
    source = resolve_model(model_dir)
    tokenizer = load_tokenizer(source)
    model = load_reward_model(source, torch.float32, device)
    max_length = model_max_length(tokenizer, model.config, max_length)
    pairs = load_preferences(data)
    if not pairs:
        raise ValueError(f"{data} holds no preference pairs")
    scores = score_pairs(model, tokenizer, pairs, max_length, batch_size)
    len_chosen, len_rejected = response_tokens(tokenizer, pairs)
    report = {"model": str(model_dir), "data": str(data), "max_length": max_length,
              **build_report(scores, len_chosen, len_rejected)}
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plots = write_plots(scores, len_chosen, len_rejected, report, out)
    write_html(report, plots, out / "report.html")
    return report


def main(args: Any) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    report = eval_rm(args.model, args.data, args.report, args.max_length, args.batch_size, device)
    r = report["length"]["pearson_reward_vs_tokens"]
    print(
        f"{report['pairs']} pairs: accuracy {report['accuracy']:.4f}, ties {report['ties']:.4f}, "
        f"ECE {report['calibration']['ece']:.4f}, reward~length r={'n/a' if r is None else f'{r:.3f}'}; "
        f"report in {Path(args.report) / 'report.html'}"
    )
    return 0

