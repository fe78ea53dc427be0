"""Records of prompt files (PPO, GRPO, eval bon), KTO's unpaired files and PRM stepwise files: plain strings as
prompts, records that are no JSON object, and a folder saved by `datasets` as the source."""

from __future__ import annotations

import json

import pytest

from training.evaluate_bon import load_prompts as bon_prompts
from training.grpo import load_grpo_prompts
from training.kto import load_unpaired
from training.prm_batch import load_stepwise
from training.prompts import load_prompts, parse_prompt


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_a_json_list_of_strings_is_a_prompt_list(tmp_path):
    path = tmp_path / "prompts.json"
    path.write_text(json.dumps(["Say hi.", "Tell me a joke."]))
    assert load_prompts(str(path)) == [user("Say hi."), user("Tell me a joke.")]
    assert load_grpo_prompts(str(path)) == [(user("Say hi."), None), (user("Tell me a joke."), None)]
    assert bon_prompts(path, limit=1) == [user("Say hi.")]
    assert parse_prompt("Hello") == user("Hello")
    with pytest.raises(ValueError, match="say something"):
        parse_prompt("   ")


@pytest.mark.parametrize("record, kind", [(42, "a number"), (["Say hi."], "a list"), (None, "null")])
def test_a_prompt_record_that_is_no_object_or_string_says_so(record, kind):
    with pytest.raises(ValueError, match=rf"^prompt record 1 is not a JSON object \(got {kind}\)$"):
        load_prompts(["Say hi.", record])
    with pytest.raises(ValueError, match=rf"^prompt record 1 is not a JSON object \(got {kind}\)$"):
        load_grpo_prompts(["Say hi.", record])


def test_a_question_must_be_a_string(tmp_path):
    with pytest.raises(ValueError, match=r"prompt record 0: question: expected a string, got None"):
        load_prompts([{"question": None}])  # not the prompt "None"
    (tmp_path / "bad.jsonl").write_text('"Say hi."\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: prompt record 2: no prompt"):
        bon_prompts(tmp_path / "bad.jsonl")


def test_kto_and_stepwise_records_that_are_no_object_say_so():
    with pytest.raises(ValueError, match=r"^KTO record 0 is not a JSON object \(got a string\)$"):
        load_unpaired(["chosen text"])
    with pytest.raises(ValueError, match=r"^stepwise record 0 is not a JSON object \(got a list\)$"):
        load_stepwise([["step 1", "step 2"]])


def test_saved_datasets_folders_hold_prompts_and_steps(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"question": "1 + 1?", "answer": "#### 2"}]).save_to_disk(str(tmp_path / "prompts"))
    assert load_grpo_prompts(str(tmp_path / "prompts")) == [(user("1 + 1?"), "#### 2")]
    steps = [{"prompt": "1 + 1?", "completions": ["1 + 1 = 2.", "#### 2"], "labels": [True, True]}]
    Dataset.from_list(steps).save_to_disk(str(tmp_path / "steps"))
    assert [ex.steps for ex in load_stepwise(str(tmp_path / "steps"))] == [steps[0]["completions"]]
