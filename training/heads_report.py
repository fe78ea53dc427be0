"""The figures of docs/training.md ("Helpfulness, ensembles and length debiasing") from a feature store.

    python -m training.heads_report --overlay models/default models/helpful --store runs/features/smollm2-512.pt

reads the heads of a (multi-head) overlay and their reward_stats.json, the features of each preference file from the
store (filled by `python -m training.features`; no base model is loaded), and prints markdown tables computed with
the math the server uses:

- a member's reward is features @ w (the last real token's final hidden state, fp32, times the head's row);
- a normalized member is (reward - mean) / std with the head's stats; a debiased one is
  reward - slope * (response_tokens - mean_tokens) with the head's "length" block;
- the ensemble combines the K member rewards of one input: mean, min, or mean - lambda * std (std over the members,
  population form: ddof = 0);
- a pair is right when the chosen input's combined reward is strictly higher (ties are wrong);
- uncertainty of a pair = the mean of its two inputs' member std; AUROC = P(uncertainty of a wrong pair > that of a
  right pair) (ties count one half), 0.5 = no signal;
- an overlay with an `ensemble` block (`train rm --gate`) also gets a table of what it serves: the gate head's raw
  reward above its threshold routes the input to the gate's members (their mean), elsewhere the block's combine of
  its members (normalized when the block says so); std is that of the side that answered. The generic tables leave
  the gate head out.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import torch

DEFAULT_SETS = ("harmless_dev=../shared/data/hh_harmless/dev.jsonl.gz",
                "helpful_dev=../shared/data/helpful/dev.jsonl.gz",
                "pandalm_human=../shared/data/helpful/pandalm_human.jsonl.gz")


def auroc(scores: torch.Tensor, positive: torch.Tensor) -> float:
    """P(score of a positive > score of a negative), ties one half (Mann-Whitney U / (n_pos * n_neg))."""
    pos, neg = scores[positive].double(), scores[~positive].double()
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).double().sum()
    ties = (pos[:, None] == neg[None, :]).double().sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def combine(members: torch.Tensor, rule: str, lam: float = 0.0) -> torch.Tensor:
    """(K, ...) member rewards -> (...) combined: mean | min | mean_minus_std (population std over K)."""
    if rule == "mean":
        return members.mean(0)
    if rule == "min":
        return members.min(0).values
    if rule == "mean_minus_std":
        return members.mean(0) - lam * members.std(0, unbiased=False)
    raise ValueError(f"unknown combine rule {rule!r}")


def accuracy(rewards: torch.Tensor) -> float:
    return float((rewards[..., 0] > rewards[..., 1]).double().mean())


def load_sets(specs: Sequence[str], collate: Any, store: Any) -> dict[str, dict[str, torch.Tensor]]:
    """name=path -> {"feats": (P, 2, H), "tokens": (P, 2), "pairs": the pairs} for every set."""
    from training.data import load_preferences, read_records
    from training.features import stored_pair_features
    from training.length_debias import pair_tokens

    out = {}
    for spec in specs:
        name, _, path = spec.partition("=")
        records = read_records(path)
        pairs = load_preferences(records)
        feats = stored_pair_features(collate, pairs, store)
        out[name] = {"feats": feats, "tokens": pair_tokens(collate.tokenizer, records), "pairs": pairs}
    return out


def head_stats_of(folder: Path, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    stats = json.loads((folder / "reward_stats.json").read_text())
    return stats["heads"] if "heads" in stats else {names[0]: stats}


def member_table(names: Sequence[str], rewards: dict[str, torch.Tensor], sets: dict[str, Any],
                 stats: dict[str, Any]) -> list[str]:
    """Per head and set: accuracy, r(reward, length), and both after the head's length debiasing."""
    from training.length_debias import debias, pearson

    lines = ["| head | set | accuracy | r(reward, tokens) | accuracy debiased | r debiased |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for k, name in enumerate(names):
        block = stats[name].get("length") or {"slope": 0.0, "mean_tokens": 0.0}
        for set_name, data in sets.items():
            r, n = rewards[set_name][k], data["tokens"]  # (P, 2) each
            d = debias(r, n, block["slope"], block["mean_tokens"])
            lines.append(f"| {name} | {set_name} | {accuracy(r):.4f} | {pearson(r, n):+.3f} | {accuracy(d):.4f} "
                         f"| {pearson(d, n):+.3f} |")
    return lines


def ensemble_table(rewards: dict[str, torch.Tensor], names: Sequence[str], stats: dict[str, Any],
                   lams: Sequence[float]) -> tuple[list[str], dict[str, dict[str, torch.Tensor]]]:
    """Accuracy of every combine rule, raw and normalized members, on every set; returns the combined rewards too."""
    mean = torch.tensor([stats[n]["mean"] for n in names], dtype=torch.float64)[:, None, None]
    std = torch.tensor([stats[n]["std"] for n in names], dtype=torch.float64)[:, None, None]
    rules = [("mean", 0.0), ("min", 0.0)] + [("mean_minus_std", lam) for lam in lams]
    sets = list(rewards)
    lines = ["| members | combine | " + " | ".join(sets) + " |", "| --- | --- | " + " | ".join("---:" for _ in sets) + " |"]
    combined: dict[str, dict[str, torch.Tensor]] = {}
    for norm in (False, True):
        for rule, lam in rules:
            label = rule if rule != "mean_minus_std" else f"mean - {lam:g} std"
            key = f"{'normalized' if norm else 'raw'}/{label}"
            combined[key] = {}
            cells = []
            for s in sets:
                members = rewards[s].double()  # (K, P, 2)
                if norm:
                    members = (members - mean) / std
                combined[key][s] = torch.stack([combine(members, rule, lam), members.std(0, unbiased=False)])
                cells.append(f"{accuracy(combined[key][s][0]):.4f}")
            lines.append(f"| {'normalized' if norm else 'raw'} | {label} | " + " | ".join(cells) + " |")
    return lines, combined


def declared_ensemble(rewards: torch.Tensor, names: Sequence[str], stats: dict[str, Any], block: dict[str, Any],
                      prompt_gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a multi-head overlay serves under its own name (its `ensemble` block, as service/house.py reads it),
    from (K, P, 2) head rewards and, for a gate that reads the prompt, its (P,) reward on each pair's prompt:
    (combined (P, 2), std (P, 2), routed (P, 2) bool)."""
    def used(head: str) -> torch.Tensor:
        r = rewards[names.index(head)].double()
        return (r - stats[head]["mean"]) / stats[head]["std"] if block.get("normalize") else r

    members = torch.stack([used(h) for h in block.get("members") or names])
    value = combine(members, block.get("combine", "mean"), float(block.get("penalty", 0.5)))
    spread = members.std(0, unbiased=False)
    routed = torch.zeros_like(value, dtype=torch.bool)
    gate = block.get("gate")
    if gate:
        if gate.get("reads", "input") == "prompt":
            if prompt_gate is None:
                raise ValueError("the gate reads the prompt: pass its rewards on the prompts")
            values = prompt_gate.double()[:, None].expand_as(value)
        else:
            values = rewards[names.index(gate["head"])].double()
        routed = values > float(gate["threshold"])
        side = torch.stack([used(h) for h in gate["members"]])
        value = torch.where(routed, side.mean(0), value)
        spread = torch.where(routed, side.std(0, unbiased=False), spread)
    return value, spread, routed


def declared_table(rewards: dict[str, torch.Tensor], names: Sequence[str], stats: dict[str, Any],
                   block: dict[str, Any], prompt_gate: dict[str, torch.Tensor] | None = None) -> list[str]:
    lines = ["| set | accuracy | inputs routed | pairs routed apart | AUROC(std -> wrong) |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for s, r in rewards.items():
        value, spread, routed = declared_ensemble(r, names, stats, block, (prompt_gate or {}).get(s))
        wrong = value[:, 0] <= value[:, 1]
        lines.append(f"| {s} | {accuracy(value):.4f} | {float(routed.double().mean()):.3f} | "
                     f"{float((routed[:, 0] != routed[:, 1]).double().mean()):.3f} | "
                     f"{auroc(spread.mean(1), wrong):.3f} |")
    return lines


def uncertainty_table(combined: dict[str, dict[str, torch.Tensor]], keys: Sequence[str]) -> list[str]:
    """AUROC of the pair's mean member std for predicting that the combined reward orders the pair wrongly."""
    sets = list(next(iter(combined.values())))
    lines = ["| ensemble | set | wrong pairs | AUROC(std -> wrong) |", "| --- | --- | ---: | ---: |"]
    for key in keys:
        for s in sets:
            value, spread = combined[key][s]  # (P, 2) each
            wrong = value[:, 0] <= value[:, 1]
            lines.append(f"| {key} | {s} | {int(wrong.sum())} / {len(wrong)} | {auroc(spread.mean(1), wrong):.3f} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.heads_report", description=__doc__.split("\n")[0])
    parser.add_argument("--overlay", required=True, nargs="+",
                        help="overlay folders (single or multi-head, over the same base and max length): their heads "
                             "are the members, in order")
    parser.add_argument("--store", required=True, help="the feature store holding every set's sequences")
    parser.add_argument("--sets", nargs="+", default=list(DEFAULT_SETS), help="NAME=FILE preference files")
    parser.add_argument("--lambdas", type=float, nargs="+", default=[0.5, 1.0], help="lambda of mean - lambda std")
    parser.add_argument("--uncertainty", nargs="+", default=["normalized/mean", "raw/mean"],
                        help="ensemble keys whose std-vs-error AUROC to print")
    args = parser.parse_args(argv)
    from rewardmodel.modeling import load_tokenizer, resolve_model
    from training.data import PreferenceCollator
    from training.features import FeatureStore, store_key
    from training.frozen import layer_part, store_kind
    from training.overlay_io import loaded_layers, overlay_meta, overlay_rows, read_layers_of

    folders = [Path(f) for f in args.overlay]
    metas = [overlay_meta(f) for f in folders]
    meta = metas[0]
    same = ("base_sha256", "max_length", "num_hidden_layers")
    for f, m in zip(folders[1:], metas[1:]):
        if any(m.get(k) != meta.get(k) for k in same):
            parser.error(f"{f} is over another base or max length than {folders[0]}")
    reads = sorted({tuple(read_layers_of(m)) for m in metas if read_layers_of(m)})
    if len(reads) > 1:
        parser.error(f"the overlays' features were read at different layer lists {reads}: one store holds one list")
    reads = list(reads[0]) if reads else []
    names, rows, stats, layers = [], [], {}, []
    for f, m in zip(folders, metas):
        n, w, _ = overlay_rows(f)
        names += n
        rows.append(w)
        stats |= head_stats_of(f, n)
        layers += m.get("head_layers") or [loaded_layers(m) if reads else None] * len(n)
    if len(set(names)) != len(names):
        parser.error(f"head names repeat across the overlays: {names}")
    missing = sorted({k for k in layers if reads and k not in reads})
    if missing:
        parser.error(f"heads read layers {missing}, which the store's features ({reads}) do not hold")
    weights = torch.cat(rows)  # (K, H)
    tokenizer = load_tokenizer(resolve_model(meta["base"]))
    collate = PreferenceCollator(tokenizer, int(meta["max_length"]))
    key = store_key(meta["base_sha256"], int(meta["max_length"]), meta.get("num_hidden_layers"),
                    store_kind("decoder", reads))
    store = FeatureStore.open(args.store, key)
    sets = load_sets(args.sets, collate, store)

    def head_rewards(feats: torch.Tensor, k: int) -> torch.Tensor:
        return layer_part(feats, reads, layers[k]) @ weights[k]

    rewards = {s: torch.stack([head_rewards(d["feats"], k) for k in range(len(names))])
               for s, d in sets.items()}  # (K, P, 2)
    print("\n".join(member_table(names, rewards, sets, stats)) + "\n")
    block = meta.get("ensemble")
    if block:
        print(f"The ensemble {folders[0].name} serves (its overlay's `ensemble` block):\n")
        prompt_gate = None
        if block.get("gate") and block["gate"].get("reads", "input") == "prompt":
            from training.features import encode_prompts, sequence_key

            prompt_gate = {}
            gate_k = names.index(block["gate"]["head"])
            for name, data in sets.items():
                seqs, index = encode_prompts(collate, data["pairs"])
                keys = [sequence_key(q) for q in seqs]
                missing = sum(k not in store for k in keys)
                if missing:
                    parser.error(f"{missing} prompts of set {name} are not in the store: `rewardserve train gate` "
                                 "with --eval-positive/--eval-negative fills them, or python -m training.features "
                                 "--prompts-only")
                prompt_gate[name] = head_rewards(store.lookup(keys), gate_k)[index]
        print("\n".join(declared_table(rewards, names, stats, block, prompt_gate)) + "\n")
    gates = {block["gate"]["head"]} if block and block.get("gate") else set()
    scorers = [k for k, n in enumerate(names) if n not in gates]  # a gate's logit is no reward to combine
    if len(scorers) > 1:
        picked = {s: r[scorers] for s, r in rewards.items()}
        lines, combined = ensemble_table(picked, [names[k] for k in scorers], stats, args.lambdas)
        print("\n".join(lines) + "\n")
        print("\n".join(uncertainty_table(combined, args.uncertainty)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
