"""bench/gpu_check.py runs its CUDA checks' code on the CPU too (tiny models): the invariance checks find no
mismatch (int8x3 / int8x5 included where int8 GEMMs are exact, and the torch.compile-fused bf16 decoder where a
compiler is), transformers' padded forward is measured beside ours, and the last line is one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--size", "tiny", "--inputs", "12",
         "--max-len", "150", "--repeats", "1", "--group", "3", "--profile", "3"],
        capture_output=True, text=True, timeout=600, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["invariant_everywhere"] is True
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == result
    llama = result["llama"]
    for dtype in ("float32", "bfloat16"):
        ours = llama[f"ours/{dtype}"]
        assert ours["packed_random"]["mismatches"] == 0 and ours["packed_random"]["of"] == 12
        assert ours["grouped"]["mismatches"] == 0 and ours["grouped"]["of"] >= 6
        assert ours["tokens_per_s"] > 0
        assert "padded_batch_vs_alone" in llama[f"transformers/{dtype}"]
    layers = llama["ours/bfloat16+layers"]  # a head reading the middle layer, in the same pass as the last's
    assert layers["reads_layers"] == [1] and layers["packed_random"]["mismatches"] == 0
    assert layers["grouped"]["mismatches"] == 0 and llama["speed"]["ours_bf16_layers_vs_ours_bf16"] > 0
    assert "ours/bfloat16+layers" not in llama["precision_vs_transformers_fp32"]
    assert llama["ours/bfloat16"]["profile"]["top"]
    assert 0 < llama["precision_vs_transformers_fp32"]["ours/bfloat16"]["max_abs"] < 0.1
    probe = result["bf16x3"]  # the split-bf16 GEMM: measured where the device has fp32-result bf16 GEMMs
    assert probe["bf16"]["available"] and probe["fp32"]["max_abs_err"] < probe["bf16"]["max_abs_err"]
    x3 = probe["bf16x3"]  # CPU torch has no bf16 GEMM with an fp32 result (yet): then it says why
    assert (x3["available"] and x3["max_abs_err"] < probe["bf16"]["max_abs_err"] / 10) or (
        not x3["available"] and "dtype" in x3["why"]), x3
    assert "grouped" not in result["bert"]["ours/float32"]  # encoders attend both ways: never grouped
    if "ours/int8x5" in llama:  # where the int8 GEMM is exact: invariant and nearer fp32 than bf16
        precision = llama["precision_vs_transformers_fp32"]
        for gemm in ("int8x3", "int8x5"):
            assert llama[f"ours/{gemm}"]["packed_random"]["mismatches"] == 0
            assert llama[f"ours/{gemm}"]["grouped"]["mismatches"] == 0
            assert precision[f"ours/{gemm}"]["max_abs"] < precision["ours/bfloat16"]["max_abs"]
        assert llama["speed"]["ours_int8x5_vs_ours_fp32"] > 0
    fused = llama["ours/bfloat16+compiled"]  # the torch.compile-fused decoder, where a compiler is
    if "skipped" not in fused:
        assert fused["compiled"] is True and fused["compile_error"] is None and fused["compile_s"] > 0
        assert fused["packed_random"]["mismatches"] == 0 and fused["grouped"]["mismatches"] == 0
        assert llama["speed"]["ours_bf16_compiled_vs_ours_bf16"] > 0
    else:
        assert "compiler" in fused["skipped"] or "triton" in fused["skipped"]
