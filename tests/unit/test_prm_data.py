"""training.prm_data: GSM8K solutions -> TRL stepwise records with synthetic step labels (fixtures made here)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from training.prm_batch import load_stepwise, parse_stepwise
from training.prm_data import (
    build, main, perturb_line, perturbed_number, question_records, solution_steps, split_questions,
)

ANSWER = ("Tom buys 3 packs of 12 pens, so 3 * 12 = <<3*12=36>>36 pens.\n"
          "He gives away 1,200 / 100 = <<1200/100=12>>12 pens.\n"
          "He keeps the rest.\n"
          "So he has 36 - 12 = <<36-12=24>>24 pens left.\n"
          "#### 24")
ROWS = [{"question": f"Question {i}: how many pens?", "answer": ANSWER.replace("Tom", f"Tom{i}")} for i in range(20)]


def test_steps_are_the_lines_without_annotations_and_the_final_answer_is_the_last_step():
    assert solution_steps(ANSWER) == [
        "Tom buys 3 packs of 12 pens, so 3 * 12 = 36 pens.", "He gives away 1,200 / 100 = 12 pens.",
        "He keeps the rest.", "So he has 36 - 12 = 24 pens left.", "#### 24",
    ]
    assert solution_steps("a\n\n  \nb <<1+1=2>>2\n#### 2") == ["a", "b 2", "#### 2"]


def test_the_perturbed_number_is_the_computed_result_in_its_own_format():
    rng = np.random.default_rng(0)
    line = "so 3 * 12 = <<3*12=36>>36 pens."
    changed = perturb_line(line, rng)
    assert changed.startswith("so 3 * 12 = <<3*12=36>>") and changed != line  # the operands are untouched
    assert perturb_line("He keeps the rest.", rng) is None
    assert perturb_line("#### 24", rng).startswith("#### ") and perturb_line("#### 24", rng) != "#### 24"
    for text in ("1,250", "3.5", "0", "7", "10,000,000"):
        for seed in range(20):
            new = perturbed_number(text, np.random.default_rng(seed))
            assert new != text and float(new.replace(",", "")) >= 0
            assert ("," in new) == ("," in text) or float(new.replace(",", "")) < 1000
            assert ("." in new) == ("." in text)
    for text, zeros in (("540", "0"), ("1,200", "00"), ("30", "0")):
        changed = {perturbed_number(text, np.random.default_rng(seed)) for seed in range(20)}
        assert text not in changed and all(c.endswith(zeros) for c in changed)  # as round as the original


def test_labels_flip_at_the_perturbed_step_and_later_steps_keep_their_text():
    correct, wrong = question_records(3, "q", ANSWER, seed=0, wrong_per_question=1)
    steps = solution_steps(ANSWER)
    assert correct == {"prompt": "q", "completions": steps, "labels": [True] * 5, "gsm8k_index": 3}
    changed = [i for i, (a, b) in enumerate(zip(steps, wrong["completions"])) if a != b]
    assert len(changed) == 1 and changed[0] != 2  # one step changed; never the step without a number
    at = changed[0]
    assert wrong["labels"] == [i < at for i in range(5)]
    assert wrong["completions"][at + 1 :] == steps[at + 1 :]


def test_several_wrong_solutions_change_different_steps_and_every_record_parses():
    records = question_records(0, "q", ANSWER, seed=1, wrong_per_question=4)
    firsts = [r["labels"].index(False) for r in records[1:]]
    assert len(records) == 5 and sorted(firsts) == [0, 1, 3, 4]  # the 4 steps that hold a number, once each
    for r in records:
        ex = parse_stepwise(r)
        assert ex.steps == r["completions"] and ex.labels == r["labels"]


def test_the_set_is_deterministic_and_split_by_question():
    train, dev = build(ROWS, seed=7, dev_fraction=0.25)
    assert (train, dev) == build(ROWS, seed=7, dev_fraction=0.25)
    assert build(ROWS, seed=8, dev_fraction=0.25) != (train, dev)
    train_q, dev_q = {r["gsm8k_index"] for r in train}, {r["gsm8k_index"] for r in dev}
    assert len(dev_q) == 5 and len(train_q) == 15 and not train_q & dev_q
    assert len(train) == 30 and sum(all(r["labels"]) for r in train) == 15
    assert split_questions(20, 0.25, 7) == (sorted(train_q), sorted(dev_q))


def test_the_command_writes_jsonl_a_manifest_and_identical_files_twice(tmp_path, capsys):
    source = tmp_path / "gsm8k.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    for out in ("a", "b"):
        assert main(["--source", str(source), "--out", str(tmp_path / out), "--seed", "3"]) == 0
    for name in ("train.jsonl", "dev.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["dev"]["questions"] == 4 and manifest["train"]["records"] == 32
    assert "synthetic" in manifest["labels"]
    assert len(load_stepwise(str(tmp_path / "a" / "train.jsonl"))) == 32
    assert "bad" in capsys.readouterr().out


@pytest.mark.parametrize("record, message", [
    ({"completions": ["a"], "labels": [True]}, "prompt"),
    ({"prompt": "p", "completions": [], "labels": []}, "completions"),
    ({"prompt": "p", "completions": ["a", " "], "labels": [True, True]}, "completions"),
    ({"prompt": "p", "completions": ["a", "b"], "labels": [True]}, "labels"),
    ({"prompt": "p", "completions": ["a"], "labels": ["yes"]}, "labels"),
])
def test_bad_stepwise_records_are_refused_naming_the_field(record, message):
    with pytest.raises(ValueError, match=message):
        parse_stepwise(record)
    with pytest.raises(ValueError, match="record 1"):
        load_stepwise([{"prompt": "p", "completions": ["a"], "labels": [1]}, record])
