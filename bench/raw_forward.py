"""The ceiling: the raw forward of the reward model alone, offline, at several batch sizes.

The model is loaded exactly as the server loads it (`rewardmodel.modeling.load_reward_model`, same ModelSource,
same dtype, same seeded head); torch threads = `threads` (all available cores by default). The workload's
pairs are tokenized with `rewardmodel.rendering.encode_input` (NOT timed), sorted by length, cut into batches of
`bs` and right-padded to the longest of each batch; only `reward_forward` under inference_mode is timed.
Each batch size runs whole passes over the workload (at least one, more until `duration_s` is reached) after
a short warm-up (the shortest and the longest batch).

Optionally (`--packed`) the same sweep of rewardserve's own padding-free forward (`service.backends.packing`,
sequences concatenated into one row, attention per sequence; the packing is timed): the server's compute
ceiling, which can beat the padded raw forward (the rewardserve CPU default is packing=auto -> on).

bench/serve.py calls `measure` in its own process before any server starts (OMP_WAIT_POLICY=PASSIVE is set
there before torch is imported). Standalone:

    python bench/raw_forward.py --model minilm --dtype float32 --pairs 256 --batch-sizes 1,2,4,8,16,32
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _padded_batches(torch: Any, ids: list[list[int]], bs: int, pad_id: int) -> list[tuple[tuple, int, int, int]]:
    """((input_ids, attention_mask), pairs, real tokens, computed tokens) per batch of the length-sorted inputs."""
    out = []
    order = sorted(ids, key=len)
    for start in range(0, len(order), bs):
        chunk = order[start : start + bs]
        longest = max(len(x) for x in chunk)
        input_ids = torch.full((len(chunk), longest), pad_id, dtype=torch.long)  # (B, T)
        mask = torch.zeros((len(chunk), longest), dtype=torch.long)  # (B, T)
        for row, x in enumerate(chunk):
            input_ids[row, : len(x)] = torch.tensor(x, dtype=torch.long)
            mask[row, : len(x)] = 1
        out.append(((input_ids, mask), len(chunk), sum(len(x) for x in chunk), input_ids.numel()))
    return out


def _packed_batches(ids: list[list[int]], bs: int) -> list[tuple[tuple, int, int, int]]:
    """((id lists,), pairs, real tokens, computed tokens): the same length-sorted chunks, unpadded."""
    order = sorted(ids, key=len)
    chunks = [order[start : start + bs] for start in range(0, len(order), bs)]
    return [((chunk,), len(chunk), sum(map(len, chunk)), sum(map(len, chunk))) for chunk in chunks]


def _one_size(torch: Any, forward: Callable[..., Any], batches: list, bs: int, duration_s: float) -> dict[str, Any]:
    with torch.inference_mode():
        for args, *_ in (batches[0], batches[-1]):  # warm-up: shortest and longest shapes
            forward(*args)
        pairs = real = computed = passes = 0
        start = time.perf_counter()
        while passes == 0 or time.perf_counter() - start < duration_s:
            for args, n_pairs, n_real, n_computed in batches:
                forward(*args)
                pairs += n_pairs
                real += n_real
                computed += n_computed
            passes += 1
        seconds = time.perf_counter() - start
    return {
        "batch_size": bs, "pairs_per_s": round(pairs / seconds, 3), "tokens_per_s": round(real / seconds, 1),
        "padding_ratio": round(1 - real / computed, 4), "passes": passes, "pairs": pairs, "seconds": round(seconds, 3),
    }


def _sweep(torch: Any, label: str, forward: Callable[..., Any], make: Callable[[int], list],
           batch_sizes: Sequence[int], duration_s: float) -> dict[str, Any]:
    by_bs = []
    for bs in batch_sizes:
        by_bs.append(_one_size(torch, forward, make(bs), bs, duration_s))
        print(f"[bench] {label} bs={bs}: {by_bs[-1]['pairs_per_s']:.2f} pairs/s", file=sys.stderr, flush=True)
    best = max(by_bs, key=lambda r: r["pairs_per_s"])
    return {"best_batch_size": best["batch_size"], "best_pairs_per_s": best["pairs_per_s"], "by_batch_size": by_bs}


def measure(model_spec: str, dtype: str, threads: int, inputs: Sequence[dict[str, str]],
            batch_sizes: Sequence[int], duration_s: float, check_n: int = 8, packed: bool = False) -> dict[str, Any]:
    """Pairs/s of the raw forward per batch size, the best one, and bs=1 rewards of the first check_n pairs.

    packed=True also sweeps rewardserve's padding-free forward (`service.backends.packing`) over the same
    length-sorted chunks, as `packed` (None when the model's head cannot be packed); it runs last, because
    it switches the model's attention implementation.
    """
    import torch

    from rewardmodel.modeling import load_reward_model, load_tokenizer, resolve_model, reward_forward
    from rewardmodel.rendering import encode_input, model_max_length

    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        source = resolve_model(model_spec)
        tokenizer = load_tokenizer(source)
        model = load_reward_model(source, getattr(torch, dtype), "cpu")
        max_length = model_max_length(tokenizer, model.config)
        pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        ids = [encode_input(tokenizer, inp, max_length).input_ids for inp in inputs]
        with torch.inference_mode():
            check = [reward_forward(model, torch.tensor([x]), torch.ones(1, len(x), dtype=torch.long))[0].item()
                     for x in ids[:check_n]]
        result = _sweep(torch, f"raw {dtype}", lambda i, m: reward_forward(model, i, m),
                        lambda bs: _padded_batches(torch, ids, bs, pad_id), batch_sizes, duration_s)
        result.update({"threads": torch.get_num_threads(), "check_rewards": check, "model_path": str(source.path),
                       "model_name": source.name})
        if 1 in batch_sizes:
            result["served_forward_bs1"] = _served_forward_bs1(model_spec, dtype, ids, duration_s)
        if packed:
            result["packed"] = _packed_sweep(torch, model, ids, dtype, batch_sizes, duration_s)
        return result
    finally:
        torch.set_num_threads(before)


def _served_forward_bs1(model_spec: str, dtype: str, ids: list[list[int]], duration_s: float) -> dict[str, Any]:
    """The forward the server runs (its own backend, loaded as `rewardserve serve` loads it: the batch-invariant
    forward where the model has one), called directly on one input at a time: the bare cost of a lone request,
    without HTTP, tokenizing or the batcher."""
    from service.backends.hf_backend import HFBackend
    from service.config import ServeConfig
    from service.grouping import PlannedBatch

    backend = HFBackend(ServeConfig(model=model_spec, dtype=dtype, device="cpu", warmup=False))
    try:
        for x in (ids[0], ids[-1]):
            backend.rewards(PlannedBatch([x]))
        n = 0
        start = time.perf_counter()
        while n < len(ids) or time.perf_counter() - start < duration_s:
            backend.rewards(PlannedBatch([ids[n % len(ids)]]))
            n += 1
        seconds = time.perf_counter() - start
        return {"forward": backend.describe()["forward"], "inputs": n, "ms_per_input": round(1000 * seconds / n, 2)}
    finally:
        backend.close()


def _packed_sweep(torch: Any, model: Any, ids: list[list[int]], dtype: str, batch_sizes: Sequence[int],
                  duration_s: float) -> dict[str, Any] | None:
    from service.backends import packing

    kind = packing.head_kind(model)
    if kind is None:
        print(f"[bench] raw-packed: {type(model).__name__} cannot be packed; skipped", file=sys.stderr)
        return None
    model.set_attn_implementation(packing.register())
    return _sweep(torch, f"raw-packed {dtype}", lambda chunk: packing.packed_reward_forward(model, kind, chunk),
                  lambda bs: _packed_batches(ids, bs), batch_sizes, duration_s)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    from bench.workload import DEFAULT_DATA, build_pairs, describe, served_max_length
    from rewardmodel.modeling import load_tokenizer, resolve_model

    parser = argparse.ArgumentParser(description="Raw forward pairs/s per batch size (the ceiling).")
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--min-tokens", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=512)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--packed", action="store_true", help="also sweep rewardserve's packed (padding-free) forward")
    args = parser.parse_args(argv)
    model_source = resolve_model(args.model)
    tokenizer = load_tokenizer(model_source)
    max_length = served_max_length(model_source, tokenizer)
    pairs, source = build_pairs(tokenizer, max_length, args.pairs, args.min_tokens, args.max_tokens, data_path=DEFAULT_DATA)
    result = measure(args.model, args.dtype, args.threads, [p.as_input() for p in pairs],
                     [int(b) for b in args.batch_sizes.split(",")], args.duration, packed=args.packed)
    print(json.dumps({"lengths": {**describe(pairs), "source": source}, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
