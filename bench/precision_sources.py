"""Where a bf16 forward's error comes from: every GEMM's rounding, emulated one source at a time.

Our bf16 forward keeps the residual stream, norms, softmax and head in fp32; its GEMMs take bf16 inputs and weights
and (on a CPU, where torch 2.13 has no bf16 GEMM with an fp32 result) give a bf16 output. This bench scores the
first --pairs HH harmless dev pairs with our batch-invariant forward in fp32 (the reference), then again with the
rounding of each source emulated in fp32 arithmetic (`t.bfloat16().float()`), so each source's share of the
error is measured alone and in combination:

  weights       the GEMM weights rounded to bf16 (what splitting activations into bf16 hi + lo parts leaves)
  activations   every GEMM's input rounded
  outputs       every GEMM's result rounded
  all           the three at once: what a bf16 forward does (compare with bench/precision.py's bf16 row)
  all, keep K   all, except the GEMMs of kind K (q, k, v, o, gate, up, down) left in fp32

For each: max and mean |reward - fp32 reward|, against the issue's budget (max <= 5e-3). Emulation is exact
about rounding but not about speed: the seconds are fp32 GEMMs plus the rounding passes. Prints the machine first
and one JSON object last.

    python bench/precision_sources.py [--model default] [--pairs 12] [--modes weights,activations,...]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.precision import BUDGET_MAX_ABS, load_backend, score_all  # noqa: E402

SOURCES = {"weights": {"w"}, "activations": {"x"}, "outputs": {"y"}, "weights+activations": {"w", "x"},
           "all": {"w", "x", "y"}}
KINDS = ("q", "k", "v", "o", "gate", "up", "down")
DEFAULT_MODES = "weights,activations,outputs,weights+activations,all,all-keep-o+down,all-keep-gate+up+down"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="a Llama-family reward model (the default: SmolLM2 + head)")
    p.add_argument("--data", default="../shared/data/hh_harmless/dev.jsonl.gz")
    p.add_argument("--pairs", type=int, default=12)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--modes", default=DEFAULT_MODES,
                   help="comma-separated: a source (weights, activations, outputs, weights+activations, all) or "
                        "all-keep-K[+K...] with K among " + ", ".join(KINDS))
    return p.parse_args(argv)


def parse_mode(mode: str) -> tuple[set[str], set[str]]:
    """(rounded sources, GEMM kinds kept in fp32)."""
    if mode in SOURCES:
        return SOURCES[mode], set()
    if mode.startswith("all-keep-"):
        kept = set(mode[len("all-keep-"):].split("+"))
        if kept <= set(KINDS):
            return SOURCES["all"], kept
    raise SystemExit(f"unknown mode {mode!r}: see --help")


class Emulation:
    """Replaces each RowLinear's call by an fp32 GEMM with the chosen roundings (a layer's kind is its field)."""

    def __init__(self, forward: Any):
        import torch
        import torch.nn.functional as F

        self.rounded: set[str] = set()
        self.kept: set[str] = set()

        def bf16(t: torch.Tensor) -> torch.Tensor:
            return t.bfloat16().float()

        for layer in forward.layers:
            for kind in KINDS:
                lin = getattr(layer, kind, None)
                if lin is None:
                    continue
                weight, bias = lin.weight.float(), None if lin.bias is None else lin.bias.float()
                weight16 = bf16(weight)

                def call(x: torch.Tensor, kind: str = kind, w: torch.Tensor = weight, w16: torch.Tensor = weight16,
                         b: torch.Tensor | None = bias) -> torch.Tensor:
                    if kind in self.kept or not self.rounded:
                        return F.linear(x.float(), w, b)
                    x = bf16(x) if "x" in self.rounded else x.float()
                    y = F.linear(x, w16 if "w" in self.rounded else w, b)
                    return bf16(y) if "y" in self.rounded else y

                setattr(layer, kind, call)


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from rewardmodel.rendering import encode_input
    from service.backends.precision import machine
    from training.data import load_preferences, read_records

    args = parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    plans = {m: parse_mode(m) for m in modes}
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    backend = load_backend(args.model, "invariant/float32", "cpu", 0)
    forward = backend.invariant
    if forward is None or not hasattr(forward, "layers") or not hasattr(forward.layers[0], "gate"):
        raise SystemExit("--model must be a Llama-family decoder served by the invariant forward")
    pairs = load_preferences(read_records(args.data))[: args.pairs]
    inputs = [inp for p in pairs for inp in (p.chosen_input(), p.rejected_input())]
    rows = [encode_input(backend.tokenizer, inp, backend.max_length).input_ids for inp in inputs]
    emulation = Emulation(forward)
    reference, _ = score_all(backend, rows, args.batch_tokens)
    ref = torch.tensor(reference, dtype=torch.float64)
    print(f"reference: {len(rows)} rewards, {sum(map(len, rows))} tokens, rewards in "
          f"[{float(ref.min()):.3f}, {float(ref.max()):.3f}]", flush=True)
    results: dict[str, Any] = {}
    for mode, (rounded, kept) in plans.items():
        emulation.rounded, emulation.kept = rounded, kept
        rewards, seconds = score_all(backend, rows, args.batch_tokens)
        diff = (torch.tensor(rewards, dtype=torch.float64) - ref).abs()
        results[mode] = {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                         "within_budget": float(diff.max()) <= BUDGET_MAX_ABS, "seconds": round(seconds, 1)}
        print(f"{mode:28s} {json.dumps(results[mode])}", flush=True)
    backend.close()
    print(json.dumps({"bench": "precision_sources", "model": args.model, "pairs": len(pairs), "rewards": len(rows),
                      "tokens": sum(map(len, rows)), "reward_range": [float(ref.min()), float(ref.max())],
                      "budget_max_abs": BUDGET_MAX_ABS, "modes": results, "machine": info}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
