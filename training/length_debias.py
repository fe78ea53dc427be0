"""Length debiasing of a reward head: fit the reward's linear dependence on response length, and remove it.

In the spirit of ODIN (Chen et al. 2024, "ODIN: Disentangled Reward Mitigates Hacking in RLHF"), which trains a
separate length head and drops it at serving time, we remove the length component after the fact: on a head's eval
rewards r_i with response lengths L_i (in tokens), the least-squares slope

    slope = cov(r, L) / var(L),       reward_debiased = reward - slope * (response_tokens - mean_tokens)

makes the debiased rewards uncorrelated with L on the fit set (r_after = 0 there up to rounding; other sets show
how well it transfers). A pair's two responses are shifted by slope * (L_c - L_r), so pairwise accuracy can change;
both are reported.

response_tokens is EXACTLY `len(tokenizer(response_text, add_special_tokens=False)["input_ids"])` with the base's
tokenizer, where response_text is the final assistant turn's text: the assistant message's content (messages), the
response (prompt + response), or for HH-RLHF dialogue strings the text after the final "\\n\\nAssistant: ". It is
the whole response, not the part left after max_length truncation. The server computes the same number.

`python -m training.length_debias --overlay models/default --eval ../shared/data/hh_harmless/dev.jsonl.gz
--feature-cache runs/features/smollm2-512.pt` adds the "length" block to an overlay's reward_stats.json (other keys
are kept as they are).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

HH_ASSISTANT = "\n\nAssistant: "
UNIT = "response_tokens"


def _hh_response(text: str) -> str:
    """The text after the final "\\n\\nAssistant: " (after "\\n\\nAssistant:" when no space follows the last one)."""
    marker = HH_ASSISTANT.rstrip(" ")
    rest = text[text.rfind(marker) + len(marker):] if marker in text else text
    return rest[1:] if rest.startswith(" ") else rest


def response_text(record: Mapping[str, Any], side: str) -> str:
    """The final assistant turn's text of `side` ("chosen" | "rejected") of a raw preference record."""
    value, prompt = record[side], record.get("prompt")
    if isinstance(value, str):
        if prompt is None:  # an HH-RLHF dialogue string
            return _hh_response(value)
        if isinstance(prompt, str) and prompt.lstrip().startswith(("Human:", "Assistant:")):  # an HH dialogue split into prompt + completion
            return _hh_response(prompt + value)
        return value  # explicit prompt: the completion is the response
    return str(value[-1]["content"])  # messages: the last one is the assistant's


def response_tokens(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    """(N,) token counts of the texts without special tokens (the length the server debiases by)."""
    return torch.tensor([len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts], dtype=torch.float64)


def pair_tokens(tokenizer: Any, records: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """(P, 2) response tokens of each record's (chosen, rejected)."""
    texts = [response_text(r, side) for r in records for side in ("chosen", "rejected")]
    return response_tokens(tokenizer, texts).view(-1, 2)


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double().flatten(), y.double().flatten()
    xc, yc = x - x.mean(), y - y.mean()
    den = float(xc.norm() * yc.norm())
    return float(xc @ yc) / den if den > 0 else float("nan")


def debias(rewards: torch.Tensor, tokens: torch.Tensor, slope: float, mean_tokens: float) -> torch.Tensor:
    """reward - slope * (response_tokens - mean_tokens), elementwise."""
    return rewards.double() - slope * (tokens.double() - mean_tokens)


def pair_accuracy(rewards: torch.Tensor) -> float:
    """Share of (P, 2) pairs whose chosen (column 0) scores strictly higher (a tie counts as wrong)."""
    return float((rewards[:, 0] > rewards[:, 1]).double().mean())


def fit_length(rewards: torch.Tensor, tokens: torch.Tensor, fit_on: str) -> dict[str, Any]:
    """The "length" block of a head's stats, fit by least squares on (rewards, tokens) of the same shape."""
    r, n = rewards.double().flatten(), tokens.double().flatten()
    mean_tokens = float(n.mean())
    var = float(((n - mean_tokens) ** 2).mean())
    slope = float(((r - r.mean()) * (n - mean_tokens)).mean()) / var if var > 0 else 0.0
    block = {"slope": slope, "mean_tokens": mean_tokens, "r_before": pearson(r, n),
             "r_after": pearson(debias(r, n, slope, mean_tokens), n), "unit": UNIT, "fit_on": fit_on}
    if rewards.dim() == 2 and rewards.shape[1] == 2:  # pairs: accuracy before / after
        block["pair_accuracy_before"] = pair_accuracy(rewards)
        block["pair_accuracy_after"] = pair_accuracy(debias(rewards, tokens, slope, mean_tokens))
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in block.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Add a "length" block (fit on --eval) to an existing single-head overlay's reward_stats.json."""
    import argparse
    import json
    import logging
    from pathlib import Path

    from rewardmodel.normalization import STATS_FILE
    from training.checkpoint import atomic_write_text
    from training.data import read_records
    from training.overlay_io import overlay_meta, overlay_rows, pair_rewards

    parser = argparse.ArgumentParser(prog="python -m training.length_debias", description=main.__doc__)
    parser.add_argument("--overlay", required=True, help="a single-head overlay folder (e.g. models/default)")
    parser.add_argument("--eval", required=True, help="the preference file to fit on (the head's eval set)")
    parser.add_argument("--feature-cache", help="feature store (training/features.py) to read / fill")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    folder = Path(args.overlay)
    names, weights, frozen = overlay_rows(folder, load_base=True)
    if len(names) != 1:
        raise SystemExit(f"{folder} holds {len(names)} heads; its length blocks are written when it is trained")
    records = read_records(args.eval)
    layers = overlay_meta(folder).get("head_layers")
    rewards = pair_rewards(frozen, records, weights, args.feature_cache, layers)[0]  # (P, 2)
    block = fit_length(rewards, pair_tokens(frozen.tokenizer, records), args.eval)
    stats = json.loads((folder / STATS_FILE).read_text())
    stats["length"] = block
    atomic_write_text(folder / STATS_FILE, json.dumps(stats, indent=2) + "\n")
    print(json.dumps(block, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
