"""`rewardserve eval bon` on a tiny policy (transformers generator) and a tiny RM: report.json + PNG."""

from __future__ import annotations

import json

import pytest

from rewardserve.cli import main


def test_eval_bon_writes_report_and_plot(tmp_path, tiny_policy_dir, tiny_llama_dir, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"turns": ["Name a fruit."]}\n{"question": "What is 3 + 4?"}\n{"prompt": "Say hi."}\n')
    report_dir = tmp_path / "report"
    code = main([
        "eval", "bon", "--policy", str(tiny_policy_dir), "--generator", "hf", "--prompts", str(prompts),
        "--n", "1,2,4", "--report", str(report_dir), "--model", str(tiny_llama_dir), "--max-tokens", "6",
        "--seed", "1", "--log-level", "warning",
    ])
    assert code == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert report["prompts"] == 3 and report["samples_per_prompt"] == 4
    assert report["generator"].startswith("hf:") and report["model"] == tiny_llama_dir.name
    assert [p["n"] for p in report["curve"]] == [1, 2, 4]
    means = [p["best_reward_mean"] for p in report["curve"]]
    assert means == sorted(means)
    per_prompt = report["per_prompt"]
    assert len(per_prompt) == 3 and all(len(row) == 4 for row in per_prompt)
    assert means[0] == pytest.approx(sum(map(sum, per_prompt)) / 12)
    assert means[-1] == pytest.approx(sum(max(row) for row in per_prompt) / 3)
    assert report["curve"][2]["kl_bon"] == pytest.approx(1.386294361 - 0.75)
    assert sum(report["rewards"]["finish_reasons"].values()) == 12
    assert (report_dir / "bon_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["samples_per_prompt"] == 4


def test_eval_bon_bad_prompts_file_is_a_clear_error(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "nothing"}\n')
    code = main(["eval", "bon", "--policy", "smollm2", "--prompts", str(bad), "--report", str(tmp_path / "r")])
    assert code == 2 and "no prompt" in capsys.readouterr().err
