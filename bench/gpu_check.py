"""The GPU check: batch invariance, precision and speed of the scoring forward on a CUDA device, in one short run.

Needs only torch and transformers (the GPU machine has no pydantic/fastapi/vllm and no model hub), so the models
are built from configs with seeded random weights in the shapes of the shipped bases: a SmolLM2-135M-shaped Llama
decoder with a score head (30 layers, 576 wide, GQA 9/3 heads) and an all-MiniLM-L6-shaped BERT encoder with a
classifier. Inputs are seeded random token ids of 16..--max-len tokens. For each model and precision:

  invariance   every input scored alone, packed with others (random batches, shuffled), and for the decoder as
               GRPO-style groups (G answers under one prompt, the prompt computed once): mismatches must be 0
               (`==`, bits). The same for transformers' own padded forward, where drift is expected (reported).
  precision    max / mean |bf16 - fp32| of the rewards, for our forward and transformers'; our forward also in
               int8x3 and int8x5 (split-int8 GEMMs with exact int32 sums) where the device's int8 GEMM is exact.
  compiled     the decoder in bf16 with its element-wise work fused by torch.compile (`--compile on`; Triton on
               CUDA): compile time, the same invariance checks, and its speed beside the unfused bf16 forward
               (`--no-compile` skips it).
  layers       the decoder in bf16 with two score heads, the first reading the middle layer and the second the
               last (an overlay's `head_layers`, as the shipped `helpful` reads six layers in one pass): the same
               invariance checks on the middle-layer head, and its speed beside one head
               (`ours_bf16_layers_vs_ours_bf16`).
  speed        tokens/s of our invariant forward (packed batches up to --batch-tokens) beside transformers'
               padded forward on the same inputs (length-sorted batches of --padded-batch), both on the device.

  bf16x3       the GEMM that would give fp32-grade rewards at bf16 speed (docs/benchmarks.md, "Where bf16's error
               comes from"): x·W as x_hi·W_hi + x_hi·W_lo + x_lo·W_hi, three bf16 GEMMs with fp32 results
               (`torch.mm(..., out_dtype=torch.float32)`, CUDA only in torch 2.11-2.13): its error against fp64,
               its speed beside bf16 and fp32, and whether a row gets the same bits alone, among 16 and among
               all rows. Reported as unavailable where the device has no such GEMM (a CPU).

Prints the machine, one line per measurement, and one JSON object last (also written to $OUT/gpu_check.json when
OUT is set). `--device cpu --size tiny` runs the same code on the CPU in seconds (tests/unit/test_gpu_check.py).

    python bench/gpu_check.py [--device cuda] [--size base|tiny] [--inputs 96] [--max-len 512]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.batching import packed_batches  # noqa: E402
from service.backends.fused import compiler_missing  # noqa: E402
from service.backends.invariant import int8_gemm_exact  # noqa: E402
from service.backends.invariant_models import build_forward  # noqa: E402
from service.backends.precision import INT8_PRODUCTS, machine  # noqa: E402
from service.grouping import Group, PlannedBatch, prefix_tree_layout  # noqa: E402

SIZES = {
    "base": {
        "llama": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rope_theta=100000.0),
        "bert": dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=12,
                     vocab_size=30522, max_position_embeddings=512),
    },
    "tiny": {
        "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=512, max_position_embeddings=512, rope_theta=10000.0),
        "bert": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=512, max_position_embeddings=512),
    },
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=sorted(SIZES), default="base")
    p.add_argument("--models", default="llama,bert")
    p.add_argument("--inputs", type=int, default=96)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--batch-tokens", type=int, default=8192, help="our forward: tokens per packed pass")
    p.add_argument("--padded-batch", type=int, default=32, help="transformers' padded forward: inputs per batch")
    p.add_argument("--group", type=int, default=8, help="answers per prompt in the grouped check")
    p.add_argument("--repeats", type=int, default=3, help="timed passes over all inputs (best kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-compile", action="store_true", help="skip the decoder's torch.compile-fused bf16 run")
    p.add_argument("--profile", type=int, default=12, help="profile one bf16 pass of our forward per model: the top "
                                                          "N ops by self time (0: none)")
    return p.parse_args(argv)


def build_model(kind: str, size: str, device: str) -> Any:
    """A reward model from a config, seeded random weights, fp32, on the device."""
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(**SIZES[size]["llama"], num_labels=1, pad_token_id=0, tie_word_embeddings=True)
        model = LlamaForSequenceClassification(config)
    else:
        config = BertConfig(**SIZES[size]["bert"], num_labels=1, pad_token_id=0)
        model = BertForSequenceClassification(config)
    return model.eval().to(device)


def layered_copy(model: Any, device: str) -> Any:
    """The decoder with a second score row and the rows reading layers (middle, last): a multi-head overlay whose
    heads read two layers, as rewardmodel.modeling records it (HEAD_LAYERS)."""
    import copy

    from rewardmodel.modeling import HEAD_LAYERS

    out = copy.deepcopy(model)
    torch.manual_seed(1)
    width, layers = model.config.hidden_size, model.config.num_hidden_layers
    out.score = torch.nn.Linear(width, 2, bias=False).to(device)
    out.config.num_labels = 2
    setattr(out, HEAD_LAYERS, (max(1, layers // 2), layers))
    return out.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Ours:
    """Our batch-invariant forward (service/backends/invariant*.py), called as the server's backend calls it."""

    def __init__(self, model: Any, dtype: torch.dtype, max_len: int, device: str, gemm: str = "native",
                 compile: bool = False):
        self.fwd = build_forward(model, dtype, max_len, gemm, compile=compile)
        if self.fwd is None:
            raise RuntimeError(f"no invariant forward for {type(model).__name__}")
        self.decoder = self.fwd.causal
        self.device = device

    def rewards(self, seqs: Sequence[Sequence[int]], groups: Sequence[Group] = ()) -> list[float]:
        batch = PlannedBatch(seqs, groups)
        tree = batch.layout if self.decoder and batch.min_shared > 0 else prefix_tree_layout(batch, 0)
        tiles = self.fwd.layout(tree, 0).to(self.device)
        with torch.inference_mode():
            flat = self.fwd(tiles)[:, 0].float().cpu()
        ends = torch.tensor([len(r) for r in tiles.read]).cumsum(0) - 1
        return [float(flat[i]) for i in ends]


class Padded:
    """transformers' own forward over right-padded batches (the usual GPU serving path), in the given dtype."""

    def __init__(self, model: Any, dtype: torch.dtype, device: str):
        self.model = model.to(dtype)
        self.device = device
        self.decoder = hasattr(model, "score")

    def rewards(self, seqs: Sequence[Sequence[int]], groups: Sequence[Group] = ()) -> list[float]:
        longest = max(map(len, seqs))
        ids = torch.zeros(len(seqs), longest, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.inference_mode():
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
        return [float(x) for x in logits[:, 0].float().cpu()]


def make_inputs(n: int, max_len: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(16, max_len))] for _ in range(n)]


def make_groups(n_groups: int, g: int, max_len: int, vocab: int, seed: int) -> list[list[list[int]]]:
    rng = random.Random(seed + 1)
    out = []
    for _ in range(n_groups):
        prompt = [rng.randrange(3, vocab) for _ in range(rng.randint(32, max_len // 2))]
        out.append([prompt + [rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len // 2))]
                    for _ in range(g)])
    return out


def score_in(scorer: Any, seqs: Sequence[Sequence[int]], plan: Sequence[Sequence[int]]) -> list[float]:
    out = [0.0] * len(seqs)
    for idx in plan:
        for i, r in zip(idx, scorer.rewards([seqs[i] for i in idx])):
            out[i] = r
    return out


def drift(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    d = [abs(x - y) for x, y in zip(a, b)]
    return {"mismatches": sum(x != y for x, y in zip(a, b)), "of": len(d), "max_abs": max(d), "mean_abs":
            sum(d) / len(d)}


def timed(fn: Callable[[], Any], device: str, repeats: int) -> float:
    fn()  # warm-up (kernel selection, allocator)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def profile_pass(ours: Ours, batch: Sequence[Sequence[int]], device: str, top: int) -> dict[str, Any]:
    """Where one packed pass of our forward spends its time: building the layout (CPU) vs the forward, and the top
    ops by self time on the device (CUDA) or the CPU."""
    from torch.profiler import ProfilerActivity, profile

    t0 = time.perf_counter()
    tree = prefix_tree_layout(PlannedBatch(batch), 0)
    tiles = ours.fwd.layout(tree, 0).to(device)
    sync(device)
    t1 = time.perf_counter()
    with torch.inference_mode():
        ours.fwd(tiles)
    sync(device)
    t2 = time.perf_counter()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with profile(activities=activities) as prof, torch.inference_mode():
        ours.fwd(tiles)
        sync(device)
    cuda = device.startswith("cuda")
    events = sorted(prof.key_averages(), key=lambda e: -(e.self_device_time_total if cuda else e.self_cpu_time_total))
    ops = [{"op": e.key[:80], "calls": e.count, "self_device_ms": round(e.self_device_time_total / 1e3, 2) if cuda else None,
            "self_cpu_ms": round(e.self_cpu_time_total / 1e3, 2)} for e in events[:top]]
    return {"tokens": sum(map(len, batch)), "layout_ms": round((t1 - t0) * 1e3, 1),
            "forward_ms": round((t2 - t1) * 1e3, 1),
            "device_ms": round(sum(e.self_device_time_total for e in prof.key_averages()) / 1e3, 1) if cuda else None,
            "top": ops}


def split_bf16(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    hi = t.to(torch.bfloat16)
    return hi, (t - hi.float()).to(torch.bfloat16)


def bf16x3_probe(device: str, rows: int, repeats: int) -> dict[str, Any]:
    """A SmolLM2 MLP-shaped GEMM (rows x 576 @ 576 x 1536) four ways: fp32, bf16 (bf16 result), bf16 with an fp32
    result, and bf16x3 with fp32 results."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(rows, 576, generator=gen).to(device)
    w = (torch.randn(576, 1536, generator=gen) / 24).to(device)
    exact = (x.double() @ w.double())
    (x_hi, x_lo), (w_hi, w_lo) = split_bf16(x), split_bf16(w)

    def mm32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.mm(a, b, out_dtype=torch.float32)

    ways: dict[str, Callable[[int, int], torch.Tensor]] = {  # rows lo..hi of the product, each way
        "fp32": lambda lo, hi: torch.mm(x[lo:hi], w),
        "bf16": lambda lo, hi: torch.mm(x_hi[lo:hi], w_hi).float(),
        "bf16_fp32_out": lambda lo, hi: mm32(x_hi[lo:hi], w_hi),
        "bf16x3": lambda lo, hi: mm32(x_hi[lo:hi], w_hi) + (mm32(x_hi[lo:hi], w_lo) + mm32(x_lo[lo:hi], w_hi)),
    }
    out: dict[str, Any] = {"shape": [rows, 576, 1536]}
    for name, way in ways.items():
        try:
            full = way(0, rows)
        except (RuntimeError, NotImplementedError) as exc:
            out[name] = {"available": False, "why": str(exc).splitlines()[0][:160]}
            continue
        seconds = timed(lambda: way(0, rows), device, repeats)  # noqa: B023 - called within this iteration
        row = 7  # a row alone, among its 16-row tile, and among every row
        same = bool(torch.equal(way(row, row + 1)[0], full[row]) and torch.equal(way(0, 16)[row], full[row]))
        out[name] = {"available": True, "max_abs_err": float((full.double() - exact).abs().max()),
                     "tflops": round(2 * rows * 576 * 1536 / seconds / 1e12, 3), "row_invariant": same}
    return out


def check_model(kind: str, args: argparse.Namespace, report: Callable[[str, dict], None]) -> dict[str, Any]:
    model = build_model(kind, args.size, args.device)
    vocab = model.config.vocab_size
    max_len = min(args.max_len, model.config.max_position_embeddings)
    seqs = make_inputs(args.inputs, max_len, vocab, args.seed)
    tokens = sum(map(len, seqs))
    rng = random.Random(args.seed + 2)
    shuffled = list(range(len(seqs)))
    rng.shuffle(shuffled)
    random_plan = [shuffled[i:i + 12] for i in range(0, len(shuffled), 12)]
    sorted_plan = packed_batches([len(s) for s in seqs], args.batch_tokens)
    padded_plan = [sorted(range(len(seqs)), key=lambda i: len(seqs[i]))[i:i + args.padded_batch]
                   for i in range(0, len(seqs), args.padded_batch)]
    result: dict[str, Any] = {"inputs": len(seqs), "tokens": tokens}
    rewards: dict[str, list[float]] = {}
    precisions = [("float32", torch.float32, "native"), ("bfloat16", torch.bfloat16, "native")]
    if int8_gemm_exact(args.device):  # exact int32 sums of int8 slices, fp32 activations (--dtype int8x3/int8x5)
        precisions += [(gemm, torch.float32, gemm) for gemm in INT8_PRODUCTS]
    if kind == "llama" and not args.no_compile:  # the decoder's element-wise work fused (--compile on)
        missing = compiler_missing(args.device.split(":")[0])
        if missing:
            result["ours/bfloat16+compiled"] = {"skipped": missing}
            report(f"{kind} ours bfloat16+compiled", result["ours/bfloat16+compiled"])
        else:
            precisions.append(("bfloat16+compiled", torch.bfloat16, "native"))
    layered = layered_copy(model, args.device) if kind == "llama" else None
    if layered is not None:
        precisions.append(("bfloat16+layers", torch.bfloat16, "native"))
    for name, dtype, gemm in precisions:
        started = time.perf_counter()
        ours = Ours(layered if name.endswith("+layers") else model, dtype, max_len, args.device, gemm,
                    compile=name.endswith("+compiled"))
        build_s = time.perf_counter() - started
        alone = [ours.rewards([s])[0] for s in seqs]
        entry: dict[str, Any] = {
            "one_call_gemms": sorted({lin.one_call for layer in ours.fwd.layers for lin in vars(layer).values()
                                      if hasattr(lin, "one_call")}),
            "packed_random": drift(alone, score_in(ours, seqs, random_plan)),
            "packed_sorted": drift(alone, score_in(ours, seqs, sorted_plan)),
        }
        if ours.decoder:
            groups = make_groups(max(2, args.inputs // (4 * args.group)), args.group, max_len, vocab, args.seed)
            members = [m for g in groups for m in g]
            solo = [ours.rewards([m])[0] for m in members]
            grouped = []
            for g in groups:
                prefix = len(os.path.commonprefix(g))
                grouped += ours.rewards(g, (Group(prefix, tuple(range(len(g)))),))
            entry["grouped"] = drift(solo, grouped)
        if name.endswith("+compiled"):
            entry |= {"compiled": ours.fwd.compiled, "compile_s": round(build_s, 1),
                      "compile_error": ours.fwd.compile_error}
        if name.endswith("+layers"):
            entry["reads_layers"] = sorted(int(k) for k in ours.fwd.taps)  # the earlier layers kept in the pass
        seconds = timed(lambda: score_in(ours, seqs, sorted_plan), args.device, args.repeats)
        entry["tokens_per_s"] = round(tokens / seconds, 1)
        if args.profile and name == "bfloat16":
            biggest = max(sorted_plan, key=lambda idx: sum(len(seqs[i]) for i in idx))
            entry["profile"] = profile_pass(ours, [seqs[i] for i in biggest], args.device, args.profile)
        if not name.endswith("+layers"):  # another head: not comparable with the one-head model's rewards
            rewards[f"ours/{name}"] = alone
        report(f"{kind} ours {name}", entry)
        result[f"ours/{name}"] = entry
        del ours
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        hf = Padded(model, dtype, args.device)
        alone = [hf.rewards([s])[0] for s in seqs]
        batched = score_in(hf, seqs, padded_plan)
        seconds = timed(lambda: score_in(hf, seqs, padded_plan), args.device, args.repeats)
        computed = sum(len(idx) * max(len(seqs[i]) for i in idx) for idx in padded_plan)
        entry = {"padded_batch_vs_alone": drift(alone, batched), "tokens_per_s": round(tokens / seconds, 1),
                 "padding_share": round(1 - tokens / computed, 3)}
        rewards[f"transformers/{name}"] = alone
        report(f"{kind} transformers {name}", entry)
        result[f"transformers/{name}"] = entry
    ref = rewards["transformers/float32"]
    result["precision_vs_transformers_fp32"] = {k: {kk: v for kk, v in drift(ref, r).items() if kk != "mismatches"}
                                                for k, r in rewards.items() if k != "transformers/float32"}
    report(f"{kind} precision", result["precision_vs_transformers_fp32"])
    ours_bf16 = result["ours/bfloat16"]["tokens_per_s"]
    result["speed"] = {
        "ours_bf16_vs_transformers_bf16_padded": round(ours_bf16 / result["transformers/bfloat16"]["tokens_per_s"], 3),
        "ours_bf16_vs_ours_fp32": round(ours_bf16 / result["ours/float32"]["tokens_per_s"], 3),
    } | {f"ours_{gemm}_vs_ours_fp32": round(result[f"ours/{gemm}"]["tokens_per_s"]
                                            / result["ours/float32"]["tokens_per_s"], 3)
         for gemm in INT8_PRODUCTS if f"ours/{gemm}" in result}
    if "tokens_per_s" in result.get("ours/bfloat16+compiled", {}):
        result["speed"]["ours_bf16_compiled_vs_ours_bf16"] = round(
            result["ours/bfloat16+compiled"]["tokens_per_s"] / ours_bf16, 3)
    if "ours/bfloat16+layers" in result:
        result["speed"]["ours_bf16_layers_vs_ours_bf16"] = round(
            result["ours/bfloat16+layers"]["tokens_per_s"] / ours_bf16, 3)
    report(f"{kind} speed", result["speed"])
    return result


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --device cpu")
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    t0 = time.time()

    def report(what: str, entry: dict) -> None:
        print(f"{what:28s} {json.dumps(entry)}", flush=True)

    out: dict[str, Any] = {"bench": "gpu_check", "device": args.device, "size": args.size, "machine": info}
    for kind in args.models.split(","):
        out[kind] = check_model(kind, args, report)
    out["bf16x3"] = bf16x3_probe(args.device, 16 * 64 if args.size == "base" else 64, args.repeats)
    report("bf16x3 gemm", out["bf16x3"])
    checks = [e for kind in args.models.split(",") for key, e in out[kind].items() if key.startswith("ours/")]
    out["invariant_everywhere"] = all(e[k]["mismatches"] == 0 for e in checks
                                      for k in ("packed_random", "packed_sorted", "grouped") if k in e)
    out["seconds"] = round(time.time() - t0, 1)
    line = json.dumps(out)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(line + "\n")
    print(line)
    return 0 if out["invariant_everywhere"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
