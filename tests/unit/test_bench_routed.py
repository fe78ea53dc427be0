"""bench/routed.py runs on the shipped ensemble and ends with one JSON object that says what routing cost."""

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not (ROOT.parent / "shared" / "data").is_dir() or not (
    ROOT / "models" / "safety-gate").is_dir(), reason="needs ../shared/data and the shipped gate")]


def test_routed_bench_small(capsys, monkeypatch):
    from bench.routed import main

    monkeypatch.chdir(ROOT)
    assert main(["--pairs", "3", "--repeats", "1", "--dtype", "float32"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["bench"] == "routed" and last["dtype"] == "float32"
    hh, helpful = last["sets"]["harmless_dev"], last["sets"]["helpful_dev"]
    assert hh["pairs"] == helpful["pairs"] == 3 and hh["gate_prompt_tokens"] > 0
    assert hh["routed_input_tokens"] == hh["head_input_tokens"]  # the same inputs; the prompts come on top
    assert hh["requests_routed"] >= 2 / 3 and helpful["requests_routed"] <= 1 / 3  # red-team prompts go to harmless
