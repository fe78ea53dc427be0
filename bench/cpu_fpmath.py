"""Does this CPU give bf16 speed with fp32 inputs and outputs? oneDNN's "fpmath mode" (torch:
`torch.backends.mkldnn.matmul.fp32_precision = "bf16"`) lets an fp32 matmul compute in bf16 with fp32 accumulation
and an fp32 result: the rounding of every GEMM's output to bf16 (half of a bf16 forward's error) would go. And what
do our split-int8 GEMMs (`--dtype int8x3` / `int8x5`: exact int32 sums of int8 slices) give here?

Measured side by side on this machine's CPU, at --threads threads:
  gemm     one linear (--rows x 576 @ 576 x 1536): GFLOP/s (useful fp32-equivalent FLOPs), max |error| vs fp64, and
           whether a row gets the same bits alone (1 row), among 16 and among --rows rows, for fp32 (ieee), fp32
           with the bf16 fpmath mode, bf16, int8x3 and int8x5 (service.backends.invariant.Int8Linear; int8 modes
           only where the int8 GEMM is exact).
  forward  our batch-invariant forward over a SmolLM2-135M-shaped Llama with seeded random weights (no hub needed)
           in the same modes: tokens/s, max |reward - fp32 reward|, and alone-vs-packed mismatches.
Prints the machine first and one JSON object last.

    python bench/cpu_fpmath.py [--threads 2] [--inputs 16] [--max-len 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

MODES = ("fp32", "fp32+bf16-fpmath", "bf16", "int8x3", "int8x5")


def modes() -> list[str]:
    from service.backends.invariant import int8_gemm_exact

    return [m for m in MODES if not m.startswith("int8") or int8_gemm_exact("cpu")]


def set_mode(mode: str) -> torch.dtype:
    torch.backends.mkldnn.matmul.fp32_precision = "bf16" if mode == "fp32+bf16-fpmath" else "ieee"
    return torch.bfloat16 if mode == "bf16" else torch.float32  # int8 modes: fp32 activations


def gemm(mode: str, rows: int, seconds: float) -> dict[str, Any]:
    dtype = set_mode(mode)
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(rows, 576, generator=gen), torch.randn(1536, 576, generator=gen) / 24
    ref = x.double() @ w.double().T
    xd = x.to(dtype)
    if mode.startswith("int8"):
        from service.backends.invariant import Int8Linear
        from service.backends.precision import INT8_PRODUCTS

        linear: Any = Int8Linear(w, None, INT8_PRODUCTS[mode])
    else:
        wd = w.to(dtype)

        def linear(t: torch.Tensor) -> torch.Tensor:
            return F.linear(t, wd)
    y = linear(xd)
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        linear(xd)
        best = min(best, time.perf_counter() - t0)
    one, sixteen = linear(xd[:1]), linear(xd[:16])[:1]
    return {"gflop_s": round(2 * rows * 576 * 1536 / best / 1e9, 1), "out_dtype": str(y.dtype).removeprefix("torch."),
            "max_abs_error": float((y.double() - ref).abs().max()),
            "row_same_1_16": bool(torch.equal(one, sixteen)), "row_same_16_all": bool(torch.equal(sixteen, y[:1]))}


def forward(mode: str, seqs: Sequence[Sequence[int]], reference: list[float] | None) -> tuple[dict, list[float]]:
    from bench.gpu_check import Ours, build_model

    compute = set_mode(mode)
    model = build_model("llama", "base", "cpu")
    ours = Ours(model, compute, max(map(len, seqs)), "cpu", mode if mode.startswith("int8") else "native")
    alone = [ours.rewards([s])[0] for s in seqs]
    packed = ours.rewards(list(seqs))
    ours.rewards(list(seqs))
    t0 = time.perf_counter()
    ours.rewards(list(seqs))
    seconds = time.perf_counter() - t0
    out: dict[str, Any] = {"tokens_per_s": round(sum(map(len, seqs)) / seconds, 1),
                           "alone_vs_packed_mismatches": sum(a != b for a, b in zip(alone, packed))}
    if reference is not None:
        out["max_abs_vs_fp32"] = max(abs(a - b) for a, b in zip(alone, reference))
    return out, alone


def main(argv: Sequence[str] | None = None) -> int:
    import random

    from service.backends.precision import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--inputs", type=int, default=16)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--no-forward", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    result: dict[str, Any] = {"bench": "cpu_fpmath", "threads": args.threads, "machine": info, "gemm": {},
                              "forward": {}}
    for mode in modes():
        result["gemm"][mode] = gemm(mode, args.rows, args.seconds)
        print(f"gemm {mode:18s} {json.dumps(result['gemm'][mode])}", flush=True)
    if not args.no_forward:
        rng = random.Random(0)
        seqs = [[rng.randrange(3, 49152) for _ in range(rng.randint(16, args.max_len))] for _ in range(args.inputs)]
        reference = None
        for mode in modes():
            result["forward"][mode], rewards = forward(mode, seqs, reference)
            reference = reference or rewards
            print(f"forward {mode:15s} {json.dumps(result['forward'][mode])}", flush=True)
    set_mode("fp32")
    line = json.dumps(result)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "cpu_fpmath.json").write_text(line + "\n")
    print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
