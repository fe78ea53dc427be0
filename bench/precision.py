"""Precision and speed of the forward paths, side by side, on the HH harmless dev pairs.

Every configuration scores the same chosen/rejected inputs of the first --pairs dev pairs, through the server's
own backend (service.backends.hf_backend.HFBackend, loaded as `rewardserve serve` loads it), in packed batches of
at most --batch-tokens tokens (length-sorted, as the batcher fills them):

  transformers/float32   the reference: transformers' own forward, fp32, packed
  invariant/float32      our batch-invariant forward, fp32
  transformers/bfloat16  transformers' forward in bf16 (bf16 everywhere, as HF loads it)
  invariant/bfloat16     our batch-invariant forward: bf16 matmuls, fp32 residual stream, norms, softmax and head
  invariant/bfloat16+compiled  the same with its element-wise work fused by torch.compile (--compile on)
  invariant/int8x3       our batch-invariant forward, every matmul as three exact int8 products over split operands
  invariant/int8x5       the same with five products (a third input slice): near-fp32

For each: tokens/s (the scoring passes only; tokenizing is not timed), max and mean |reward - reference reward|
over all 2 x pairs rewards, and pairwise accuracy (chosen > rejected) beside the reference's. The issue's budget
for a fast precision: max |diff| <= 5e-3 and accuracy within +-0.5 point of fp32; the JSON says whether each path
meets it.
Prints the machine (CPU, ISA) first and one JSON object last.

    python bench/precision.py [--model default] [--pairs 400] [--batch-tokens 4096] [--paths all] [--rounds 1]
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.batching import packed_batches  # noqa: E402

PATHS = ("transformers/float32", "invariant/float32", "transformers/bfloat16", "invariant/bfloat16",
         "invariant/bfloat16+compiled", "invariant/int8x3", "invariant/int8x5")
"""`+compiled`: the element-wise work fused by torch.compile (--compile on); paths without it run unfused."""
BUDGET_MAX_ABS = 5e-3
BUDGET_ACCURACY_POINTS = 0.5


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--data", default="../shared/data/hh_harmless/dev.jsonl.gz")
    p.add_argument("--pairs", type=int, default=400)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--max-length", type=int, default=0, help="cap inputs (default: the model's limit)")
    p.add_argument("--paths", default="all", help=f"comma-separated subset of {','.join(PATHS)} (the first is the "
                                                  "reference)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rounds", type=int, default=1, help="time every path this many times, alternating their order "
                                                       "(all held in memory); tokens/s is the median")
    return p.parse_args(argv)


def load_backend(model: str, path: str, device: str, max_length: int) -> Any:
    from service.backends.hf_backend import HFBackend
    from service.config import ServeConfig

    forward, dtype = path.split("/")
    dtype, _, compiled = dtype.partition("+")
    config = ServeConfig(model=model, dtype=dtype, forward=forward, device=device, warmup=False,
                         max_tokens=max_length, compile="on" if compiled else "off")
    return HFBackend(config)


def score_all(backend: Any, rows: list[list[int]], budget: int) -> tuple[list[float], float]:
    from service.grouping import PlannedBatch

    plan = packed_batches([len(r) for r in rows], budget)
    rewards: list[float] = [0.0] * len(rows)
    backend.rewards(PlannedBatch([rows[plan[0][0]]]))  # warm-up: kernel set-up outside the clock
    t0 = time.perf_counter()
    for idx in plan:
        for i, r in zip(idx, backend.rewards(PlannedBatch([rows[i] for i in idx]))):
            rewards[i] = r
    return rewards, time.perf_counter() - t0


def main(argv: Sequence[str] | None = None) -> int:
    import torch

    from rewardmodel.rendering import encode_input
    from service.backends.precision import machine
    from training.data import load_preferences, read_records

    args = parse_args(argv)
    paths = list(PATHS) if args.paths == "all" else args.paths.split(",")
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    pairs = load_preferences(read_records(args.data))[: args.pairs]
    inputs = [inp for p in pairs for inp in (p.chosen_input(), p.rejected_input())]
    results: dict[str, Any] = {}
    reference: list[float] | None = None
    rows: list[list[int]] | None = None
    backends = {}
    timings: dict[str, list[float]] = {path: [] for path in paths}
    scored: dict[str, list[float]] = {}
    described_of: dict[str, dict[str, Any]] = {}
    for path in paths:  # loaded once each, all held when rounds alternate them
        backend = load_backend(args.model, path, args.device, args.max_length)
        described_of[path] = {k: backend.describe()[k] for k in ("dtype", "forward", "compiled")}
        if rows is None:
            rows = [encode_input(backend.tokenizer, inp, backend.max_length).input_ids for inp in inputs]
        if args.rounds == 1:
            scored[path], seconds = score_all(backend, rows, args.batch_tokens)
            timings[path].append(seconds)
            backend.close()
        else:
            backends[path] = backend
    for round_ in range(args.rounds if args.rounds > 1 else 0):  # alternating order: drift hits every path alike
        for path in (paths if round_ % 2 == 0 else paths[::-1]):
            rewards, seconds = score_all(backends[path], rows, args.batch_tokens)
            if path in scored and rewards != scored[path]:
                raise SystemExit(f"{path}: a round scored other bits than the first")
            scored[path] = rewards
            timings[path].append(seconds)
    for backend in backends.values():
        backend.close()
    for path in paths:
        rewards, seconds = scored[path], statistics.median(timings[path])
        r = torch.tensor(rewards, dtype=torch.float64).view(-1, 2)
        entry: dict[str, Any] = {
            "tokens_per_s": round(sum(map(len, rows)) / seconds, 1), "seconds": round(seconds, 2),
            "accuracy": round(float((r[:, 0] > r[:, 1]).double().mean()) * 100, 2),
            **described_of[path],
        }
        if len(timings[path]) > 1:
            entry["tokens_per_s_rounds"] = [round(sum(map(len, rows)) / t, 1) for t in timings[path]]
        if reference is None:
            reference = rewards
        else:
            diff = (torch.tensor(rewards, dtype=torch.float64) - torch.tensor(reference, dtype=torch.float64)).abs()
            entry |= {"max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
                      "accuracy_points_vs_reference": round(entry["accuracy"] - results[paths[0]]["accuracy"], 2)}
            entry["within_budget"] = (entry["max_abs_diff"] <= BUDGET_MAX_ABS
                                      and abs(entry["accuracy_points_vs_reference"]) <= BUDGET_ACCURACY_POINTS)
        results[path] = entry
        print(f"{path:24s} {json.dumps(entry)}", flush=True)
    base = results[paths[0]]["tokens_per_s"]
    for path in paths[1:]:
        results[path]["speed_vs_reference"] = round(results[path]["tokens_per_s"] / base, 3)
    summary = {"bench": "precision", "model": args.model, "pairs": len(pairs), "rewards": len(rows or []),
               "tokens": sum(map(len, rows or [])), "reference": paths[0], "budget": {
                   "max_abs_diff": BUDGET_MAX_ABS, "accuracy_points": BUDGET_ACCURACY_POINTS},
               "paths": results, "machine": info}
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
