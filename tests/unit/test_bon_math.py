"""Best-of-N maths (training/evaluate_bon.py) against brute force, and ranking ties (service/bon.py)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from service.bon import rank
from service.schemas import ScoreResult
from training.evaluate_bon import bon_kl, curve, expected_best, generator_spec, load_prompts


@pytest.mark.parametrize("m", [1, 2, 5, 8])
def test_expected_best_is_the_mean_of_subset_maxima(m):
    rewards = np.random.default_rng(m).normal(size=m)
    for n in range(1, m + 1):
        brute = np.mean([max(subset) for subset in itertools.combinations(rewards, n)])
        assert expected_best(rewards, n) == pytest.approx(brute, abs=1e-12)
    assert expected_best(rewards, 1) == pytest.approx(rewards.mean())
    assert expected_best(rewards, m) == pytest.approx(rewards.max())


def test_expected_best_with_ties_and_bounds():
    assert expected_best([1.0, 1.0, 1.0], 2) == 1.0
    assert expected_best([0.0, 1.0], 2) == 1.0 and expected_best([0.0, 1.0], 1) == 0.5
    with pytest.raises(ValueError):
        expected_best([1.0, 2.0], 3)


def test_bon_kl_values():
    assert bon_kl(1) == 0.0
    assert bon_kl(2) == pytest.approx(math.log(2) - 0.5)
    assert bon_kl(16) == pytest.approx(math.log(16) - 15 / 16)


def test_curve_is_non_decreasing_and_spreads():
    rewards = np.random.default_rng(0).normal(size=(6, 16))  # 6 prompts, 16 samples each
    points = curve(rewards, [1, 2, 4, 8, 16])
    means = [p["best_reward_mean"] for p in points]
    assert means == sorted(means) and points[0]["gain_over_first"] == 0.0
    assert points[0]["best_reward_mean"] == pytest.approx(rewards.mean())
    assert points[-1]["best_reward_mean"] == pytest.approx(rewards.max(axis=1).mean())
    assert all(p["best_reward_std"] > 0 and p["best_reward_sem"] > 0 for p in points)


def test_load_prompts_formats(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(
        '{"question_id": 1, "turns": ["first turn", "second turn"]}\n'
        '{"question": "2 + 2?", "answer": "4"}\n\n'
        '{"prompt": "hello"}\n'
        '{"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]}\n'
    )
    prompts = load_prompts(path)
    assert [p[-1]["content"] for p in prompts] == ["first turn", "2 + 2?", "hello", "hi"]
    assert len(load_prompts(path, limit=2)) == 2
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt here"}\n')
    with pytest.raises(ValueError, match="no prompt"):
        load_prompts(tmp_path / "bad.jsonl")


def test_generator_spec():
    assert generator_spec("smollm2", "vllm") == "vllm:smollm2"
    assert generator_spec("openai:http://127.0.0.1:9", "vllm") == "openai:http://127.0.0.1:9"
    assert generator_spec("/models/policy", "hf") == "hf:/models/policy"


def test_rank_orders_by_reward_and_keeps_ties_in_order():
    results = [ScoreResult(reward=r, truncated=False, tokens=3) for r in (0.5, 2.0, 0.5, -1.0)]
    ranked = rank(["a", "b", "c", "d"], results, ["stop"] * 4)
    assert [(c.text, c.rank, c.index) for c in ranked] == [("b", 1, 1), ("a", 2, 0), ("c", 3, 2), ("d", 4, 3)]
