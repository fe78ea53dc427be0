"""bench/precision_sources.py emulates bf16 rounding source by source over our forward: nothing rounded (every GEMM
kept fp32) gives the fp32 reference's bits; rounding gives a difference; the last line is one JSON object."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HH_DEV = ROOT / ".." / "shared" / "data" / "hh_harmless" / "dev.jsonl.gz"


def test_precision_sources_on_a_tiny_llama(tiny_llama_dir):
    keep_all = "all-keep-q+k+v+o+gate+up+down"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "precision_sources.py"), "--model", str(tiny_llama_dir),
         "--data", str(HH_DEV), "--pairs", "3", "--modes", f"weights,outputs,all,{keep_all}"],
        capture_output=True, text=True, timeout=600, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["bench"] == "precision_sources" and result["rewards"] == 6
    modes = result["modes"]
    assert modes[keep_all]["max_abs_diff"] == 0.0
    for mode in ("weights", "outputs", "all"):
        assert modes[mode]["max_abs_diff"] > 0
    assert "cpu_capability" in result["machine"]


def test_unknown_mode_is_refused():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "precision_sources.py"), "--modes", "all-keep-lm"],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0 and "unknown mode 'all-keep-lm'" in proc.stderr
