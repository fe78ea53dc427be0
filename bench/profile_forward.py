"""Where the time of one forward pass goes: torch profiler tables for the packed and the padded forward
of the same mixed-length batch (16-512 tokens), fp32, all cores. Prints op tables, then one JSON line.

    python bench/profile_forward.py [--model minilm] [--pairs 12] [--top 12]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from service.backends import packing  # noqa: E402
from rewardmodel.modeling import load_reward_model, resolve_model, reward_forward  # noqa: E402


def padded_forward(model, batch):
    longest = max(map(len, batch))
    ids = torch.zeros(len(batch), longest, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
    return reward_forward(model, ids, mask)


def timed(fn, repeats=3):
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="minilm")
    ap.add_argument("--pairs", type=int, default=12)
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args()
    model = load_reward_model(resolve_model(args.model), torch.float32, "cpu")
    kind = packing.head_kind(model)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    batch = [[rng.randrange(1000, vocab) for _ in range(rng.randint(16, 512))] for _ in range(args.pairs)]
    tokens = sum(map(len, batch))
    out = {"model": args.model, "pairs": args.pairs, "tokens": tokens, "threads": torch.get_num_threads()}
    with torch.inference_mode():
        model.set_attn_implementation("sdpa")
        out["padded_s"] = timed(lambda: padded_forward(model, sorted(batch, key=len)))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            padded_forward(model, batch)
        print(f"== padded forward, {args.pairs} inputs, {tokens} real tokens ==")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
        if kind is not None:
            model.set_attn_implementation(packing.register())
            out["packed_s"] = timed(lambda: packing.packed_reward_forward(model, kind, batch))
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                packing.packed_reward_forward(model, kind, batch)
            print(f"== packed forward, {args.pairs} inputs, {tokens} tokens ==")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    out["padded_tok_per_s"] = round(tokens / out["padded_s"], 1)
    if "packed_s" in out:
        out["packed_tok_per_s"] = round(tokens / out["packed_s"], 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
