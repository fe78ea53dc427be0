"""training.evaluate_prm metrics on hand-made cases: step accuracy at threshold 0, ProcessBench first-error F1."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate_prm import auroc, first_error, paired_first_error, position_auroc, prm_metrics
from training.prm_batch import StepExample

T, F = True, False


def test_first_error_is_the_first_bad_step_or_minus_one():
    assert first_error([T, T, F, T]) == 2 and first_error([T, T]) == -1 and first_error([F]) == 0


def test_hand_made_cases():
    scores = [
        [1.0, 2.0, 3.0],  # correct, predicted correct: hit
        [1.0, -1.0, -2.0],  # error at 1, predicted at 1: hit
        [1.0, 2.0, -1.0],  # error at 1, predicted at 2: miss
        [-1.0, 2.0, 3.0],  # correct, predicted error at 0: miss
    ]
    labels = [[T, T, T], [T, F, F], [T, F, F], [T, T, T]]
    m = prm_metrics(scores, labels)
    assert m["steps"]["count"] == 12 and m["steps"]["good"] == 8
    assert m["steps"]["accuracy"] == pytest.approx(10 / 12)
    assert m["steps"]["accuracy_good"] == pytest.approx(7 / 8) and m["steps"]["accuracy_bad"] == pytest.approx(3 / 4)
    fe = m["first_error"]
    assert (fe["erroneous"], fe["correct"]) == (2, 2)
    assert fe["accuracy_erroneous"] == 0.5 and fe["accuracy_correct"] == 0.5 and fe["f1"] == pytest.approx(0.5)


def test_f1_is_the_harmonic_mean_and_zero_when_one_side_is_zero():
    labels = [[T, F], [T, F], [T, T]]
    m = prm_metrics([[1.0, -1.0], [1.0, 1.0], [1.0, 1.0]], labels)
    assert m["first_error"]["accuracy_erroneous"] == 0.5 and m["first_error"]["accuracy_correct"] == 1.0
    assert m["first_error"]["f1"] == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    all_good = prm_metrics([[1.0, 1.0]] * 3, labels)
    assert all_good["first_error"]["f1"] == 0.0 and all_good["first_error"]["accuracy_correct"] == 1.0


def test_a_score_at_the_threshold_is_a_bad_step_and_the_threshold_moves():
    assert prm_metrics([[0.0]], [[F]])["steps"]["accuracy"] == 1.0
    assert prm_metrics([[0.5]], [[F]], threshold=1.0)["steps"]["accuracy"] == 1.0
    only_correct = prm_metrics([[1.0]], [[T]])
    assert only_correct["first_error"]["accuracy_erroneous"] is None and only_correct["steps"]["accuracy_bad"] is None


def test_auroc_counts_ties_half_and_matches_pairwise_counting():
    assert auroc(np.array([2.0, 3.0]), np.array([1.0])) == 1.0
    assert auroc(np.array([1.0]), np.array([1.0])) == 0.5
    rng = np.random.default_rng(0)
    good, bad = rng.integers(0, 5, 40).astype(float), rng.integers(0, 5, 30).astype(float)
    pairwise = ((good[:, None] > bad[None, :]) + 0.5 * (good[:, None] == bad[None, :])).mean()
    assert auroc(good, bad) == pytest.approx(pairwise)
    assert auroc(good, np.array([])) is None


def test_mismatched_shapes_are_refused():
    with pytest.raises(ValueError):
        prm_metrics([[1.0, 2.0]], [[T]])


def test_the_position_baseline_scores_later_steps_lower():
    assert position_auroc([[T, F], [T, T, F]]) == 1.0  # every bad step is the last one
    assert position_auroc([[F, T]]) == 0.0 and position_auroc([[T, T]]) is None


def test_paired_first_error_compares_a_wrong_step_with_the_same_step_of_a_correct_solution():
    ok = StepExample("q", ["a", "b", "c"], [T, T, T])
    wrong_b = StepExample("q", ["a", "B", "c"], [T, F, F])  # pairs with ok at step 1
    wrong_a = StepExample("q", ["A", "b", "c"], [F, F, F])  # pairs with ok at step 0
    other = StepExample("r", ["x", "y"], [T, F])  # no correct solution of its prompt: no pair
    diverged = StepExample("q", ["z", "B", "c"], [T, F, F])  # differs before its first error: no pair
    scores = [[1.0, 2.0, 3.0], [1.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0], [0.0, 0.0, 0.0]]
    got = paired_first_error([ok, wrong_b, wrong_a, other, diverged], scores)
    assert got == {"pairs": 2, "wrong_lower": 0.75}  # step 1: -1 < 2 (1); step 0: 1 == 1 (a tie: 0.5)
    assert paired_first_error([other], [[0.0, 0.0]]) == {"pairs": 0, "wrong_lower": None}
