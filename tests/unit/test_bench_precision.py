"""bench/precision.py: paths side by side on the HH dev pairs, alternating rounds, one JSON object last."""

import json
from pathlib import Path

import pytest

from service.backends.fused import compiler_missing

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir(),
                                                   reason="needs ../shared/data")]


def test_precision_bench_in_alternating_rounds(capsys, monkeypatch):
    from bench.precision import main

    monkeypatch.chdir(ROOT)
    fused = "invariant/bfloat16+compiled" if compiler_missing("cpu") is None else "invariant/bfloat16"
    paths = ["invariant/float32", "invariant/bfloat16", fused]
    assert main(["--pairs", "3", "--max-length", "96", "--rounds", "2", "--paths", ",".join(paths)]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "precision" and last["rewards"] == 6 and last["reference"] == "invariant/float32"
    for path in paths:
        entry = last["paths"][path]
        assert len(entry["tokens_per_s_rounds"]) == 2 and entry["tokens_per_s"] > 0
        assert entry["compiled"] is path.endswith("+compiled")
    assert last["paths"]["invariant/bfloat16"]["dtype"] == "bfloat16"
    assert 0 < last["paths"]["invariant/bfloat16"]["max_abs_diff"] < 0.2  # bf16 really rounds, and not by much
