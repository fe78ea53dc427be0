"""Every `train` and `eval` subcommand reports a user's mistake (a missing or bad file, a refused flag value or
combination, a policy that is no causal LM, a run whose loss turns NaN) as ONE line `rewardserve <command>: error:
<message>` with exit status 2, never a traceback; and the inputs they now accept (a folder saved by `datasets`).

Each case runs the real command (rewardserve.cli.main) on tiny models; most fail before any model is loaded."""

from __future__ import annotations

import json

import pytest
import torch

from rewardserve.cli import build_parser, main
from tests.integration.test_train_rm import synthetic_pairs

torch.set_num_threads(1)

QUIET = ["--no-progress", "--log-level", "warning", "--threads", "1"]
STEPWISE = [{"prompt": "1 + 1?", "completions": ["1 + 1 = 2.", "#### 2"], "labels": [True, True]},
            {"prompt": "2 + 2?", "completions": ["2 + 2 = 5.", "#### 5"], "labels": [False, False]}]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    pairs = synthetic_pairs(4, 0)

    def write(name: str, text: str):
        (root / name).write_text(text)
        return root / name

    return {
        "pairs": write("pairs.jsonl", "".join(json.dumps(p) + "\n" for p in pairs)),
        "empty": write("empty.jsonl", ""),
        "mixed": write("mixed.jsonl", "".join(json.dumps(p | ({"margin": 1.0} if i == 2 else {})) + "\n"
                                              for i, p in enumerate(pairs))),
        "nan": write("nan.jsonl", json.dumps(pairs[0] | {"margin": "nan"}) + "\n" + json.dumps(pairs[1] | {"margin": 1})),
        "strings": write("strings.json", json.dumps(["Say hi.", "Tell me a joke."])),
        "numbers": write("numbers.jsonl", "42\n"),
        "nullq": write("nullq.jsonl", '{"question": null}\n'),
        "steps": write("steps.jsonl", "".join(json.dumps(r) + "\n" for r in STEPWISE)),
        "missing": root / "missing.jsonl",
        "notgz": write("notgz.jsonl.gz", "".join(json.dumps(p) + "\n" for p in pairs)),
        "afile": write("afile", "not a folder"),
        "root": root,
    }


def one_line_error(capsys, argv: list[str]) -> str:
    """Run the command; it must exit 2 with exactly one `rewardserve ...: error:` line and no traceback."""
    code = main(argv)
    err = capsys.readouterr().err
    ours = [line for line in err.splitlines() if line.startswith("rewardserve ")]
    assert code == 2 and len(ours) == 1 and "Traceback" not in err, err[-2000:]
    assert "errors.pydantic.dev" not in ours[0]
    return ours[0]


# ------------------------------------------------------------------------------------------------ train rm


@pytest.mark.parametrize("data, extra, expected", [
    ("missing", [], "no data file or saved dataset at {missing}"),
    ("pairs", ["--eval", "{missing}"], "no data file or saved dataset at {missing}"),
    ("pairs", ["--base", "{root}/no-model"], "model directory '{root}/no-model' does not exist"),
    ("pairs", ["--lr", "-1"], "--lr: Input should be greater than 0 (got -1.0)"),
    ("pairs", ["--lora", "--lora-r", "0"], "--lora-r: Input should be greater than 0 (got 0)"),
    ("pairs", ["--lora-r", "4"], "--lora-r needs --lora: add it, or drop the flag"),
    ("pairs", ["--eval-every", "2"], "--eval-every needs --eval (there is no eval set): add it, or drop the flag"),
    ("mixed", [], "{mixed}:1: preference record 1 has no margin but record 3 (line 3) has one: give every pair a "
     "margin, or none"),
    ("nan", [], "{nan}:1: preference record 1: margin must be a finite number, got 'nan'"),
    ("empty", [], "--data {empty} holds no records"),
    ("pairs", ["--eval", "{empty}"], "--eval {empty} holds no records"),
    ("numbers", [], "{numbers}:1: preference record 1 is not a JSON object (got a number)"),
    ("pairs", ["--head-only", "--lora"], "--lora does not apply to --head-only training"),
    ("pairs", ["--head-only", "--max-steps", "3"], "--max-steps does not apply to --head-only training"),
    ("pairs", ["--head-only", "--batch-size", "2"], "--batch-size does not apply to --head-only training"),
    ("pairs", ["--head-only", "--no-disable-dropout"], "--disable-dropout does not apply to --head-only training"),
    ("pairs", ["--head-only", "--l2", "0.1", "--epochs", "3"], "--epochs does not apply to --head-only --l2"),
    ("pairs", ["--num-layers", "2"], "--num-layers applies to --head-only training"),
    ("pairs", ["--lora", "--lora-targets", "nope"],
     "--lora-targets nope: no module of BertForSequenceClassification matches; its linear layers are named"),
    ("notgz", [], "{notgz}: not a readable gzip file (Not a gzipped file"),
    ("pairs", ["--output", "{afile}"], "--output {afile} is a file, not a folder"),
    ("pairs", ["--output", "{bert}"], "--output {bert} is the model being trained from (--base {bert})"),
    ("pairs", ["--head-only", "--output", "{bert}"], "--output {bert} is the model being trained from (--base {bert})"),
])
def test_train_rm_user_errors_are_one_line(capsys, tiny_bert_dir, files, tmp_path, data, extra, expected):
    fill = lambda text: text.format(bert=tiny_bert_dir, **files)  # noqa: E731
    line = one_line_error(capsys, ["train", "rm", "--base", str(tiny_bert_dir), "--data", str(files[data]),
                                   "--output", str(tmp_path / "out"), "--max-length", "32", *QUIET,
                                   *map(fill, extra)])
    assert line.startswith("rewardserve train rm: error: " + fill(expected)), line


def test_a_folder_saved_by_datasets_trains_a_reward_model(tiny_bert_dir, tmp_path):
    from datasets import Dataset

    Dataset.from_list(synthetic_pairs(4, 0)).save_to_disk(str(tmp_path / "saved"))
    assert main(["train", "rm", "--base", str(tiny_bert_dir), "--data", str(tmp_path / "saved"), "--output",
                 str(tmp_path / "rm"), "--max-steps", "1", "--batch-size", "2", "--max-length", "32", *QUIET]) == 0
    assert (tmp_path / "rm" / "model.safetensors").is_file()


# ---------------------------------------------------------------------------------------------- train dpo


@pytest.mark.parametrize("data, extra, expected", [
    ("pairs", ["--beta", "0"], "--beta: Input should be greater than 0 (got 0.0)"),
    ("pairs", ["--max-length", "4"], "--max-length: Input should be greater than or equal to 8 (got 4)"),
    ("pairs", ["--label-smoothing", "0.6"], "--label-smoothing: Input should be less than 0.5 (got 0.6)"),
    ("pairs", ["--loss-type", "ipo", "--label-smoothing", "0.1"], "--label-smoothing does not apply to --loss-type ipo"),
    ("missing", [], "no data file or saved dataset at {missing}"),
    ("pairs", ["--eval", "{empty}"], "--eval {empty} holds no records"),
    ("pairs", ["--eval-batch-size", "4"], "--eval-batch-size needs --eval"),
    ("strings", ["--loss-type", "kto"], "{strings}: KTO record 1 is not a JSON object (got a string)"),
    ("pairs", ["--lora", "--lora-targets", "nope"], "--lora-targets nope: no module of LlamaForCausalLM matches"),
    ("pairs", ["--policy", "{bert}"], "{bert} is not a causal language model"),
    ("pairs", ["--output", "{policy}"], "--output {policy} is the model being trained from (--policy {policy})"),
])
def test_train_dpo_user_errors_are_one_line(capsys, tiny_llama_lm_dir, tiny_bert_dir, files, tmp_path, data, extra,
                                            expected):
    fill = lambda text: text.format(bert=tiny_bert_dir, policy=tiny_llama_lm_dir, **files)  # noqa: E731
    line = one_line_error(capsys, ["train", "dpo", "--policy", str(tiny_llama_lm_dir), "--data", str(files[data]),
                                   "--output", str(tmp_path / "out"), "--max-steps", "1", *QUIET, *map(fill, extra)])
    assert line.startswith("rewardserve train dpo: error: " + fill(expected)), line
    assert not (tmp_path / "out" / "config.json").exists()  # nothing exported


# ------------------------------------------------------------------------------------------ train ppo, grpo


@pytest.mark.parametrize("prompts, extra, expected", [
    ("pairs", ["--temperature", "0"], "--temperature: Input should be greater than 0 (got 0.0)"),
    ("pairs", ["--kl-estimator", "k9"], "unknown KL estimator 'k9'; use one of ('k1', 'k2', 'k3')"),
    ("missing", [], "no data file or saved dataset at {missing}"),
    ("numbers", [], "{numbers}:1: prompt record 1 is not a JSON object (got a number)"),
    ("strings", ["--policy", "{bert}"], "{bert} is not a causal language model"),
    ("strings", ["--output", "{bert}"], "--output {bert} is the model being trained from (--reward-model {bert})"),
])
def test_train_ppo_user_errors_are_one_line(capsys, tiny_llama_lm_dir, tiny_bert_dir, files, tmp_path, prompts,
                                            extra, expected):
    fill = lambda text: text.format(bert=tiny_bert_dir, **files)  # noqa: E731
    line = one_line_error(capsys, ["train", "ppo", "--policy", str(tiny_llama_lm_dir), "--prompts",
                                   str(files[prompts]), "--reward-model", str(tiny_bert_dir), "--output",
                                   str(tmp_path / "out"), *QUIET, *map(fill, extra)])
    assert line.startswith("rewardserve train ppo: error: " + fill(expected)), line


@pytest.mark.parametrize("prompts, extra, expected", [
    ("strings", ["--format-pattern", "(a+)+"], "--format-pattern '(a+)+': nested repeats"),
    ("nullq", [], "{nullq}:1: prompt record 1: question: expected a string, got None"),
    ("strings", ["--scale-rewards", "foo"], "unknown --scale-rewards 'foo'"),
    ("strings", ["--policy", "{bert}", "--reward-weights", "format=1", "--format-pattern", ".*"],
     "{bert} is not a causal language model"),
])
def test_train_grpo_user_errors_are_one_line(capsys, tiny_llama_lm_dir, tiny_bert_dir, files, tmp_path, prompts,
                                             extra, expected):
    fill = lambda text: text.format(bert=tiny_bert_dir, **files)  # noqa: E731
    line = one_line_error(capsys, ["train", "grpo", "--policy", str(tiny_llama_lm_dir), "--prompts",
                                   str(files[prompts]), "--output", str(tmp_path / "out"), *QUIET, *map(fill, extra)])
    assert line.startswith("rewardserve train grpo: error: " + fill(expected)), line


def test_a_plain_list_of_strings_is_a_prompt_file_for_grpo(tiny_llama_lm_dir, files, tmp_path):
    assert main(["train", "grpo", "--policy", str(tiny_llama_lm_dir), "--prompts", str(files["strings"]), "--output",
                 str(tmp_path / "out"), "--reward-weights", "format=1", "--format-pattern", ".*", "--max-steps", "1",
                 "--batch-size", "2", "--group-size", "2", "--mini-batch-size", "4", "--max-new-tokens", "3",
                 *QUIET]) == 0


# ---------------------------------------------------------------------------------------- train prm, eval


@pytest.mark.parametrize("argv, expected", [
    (["train", "prm", "--base", "{bert}", "--data", "{missing}", "--output", "{out}"],
     "train prm: error: no data file or saved dataset at {missing}"),
    (["train", "prm", "--base", "{bert}", "--data", "{steps}", "--eval", "{empty}", "--output", "{out}"],
     "train prm: error: --eval {empty} holds no records"),
    (["eval", "rm", "--model", "{bert}", "--data", "{missing}", "--report", "{out}"],
     "eval rm: error: no data file or saved dataset at {missing}"),
    (["eval", "rm", "--model", "{root}/no-model", "--data", "{pairs}", "--report", "{out}"],
     "eval rm: error: model directory '{root}/no-model' does not exist"),
    (["eval", "rm", "--model", "{bert}", "--data", "{empty}", "--report", "{out}"],
     "eval rm: error: {empty} holds no preference pairs"),
    (["eval", "prm", "--model", "{bert}", "--data", "{pairs}", "--report", "{out}"],
     "eval prm: error: {pairs}:1: stepwise record 1:"),
    (["eval", "bon", "--policy", "{bert}", "--prompts", "{numbers}", "--report", "{out}"],
     "eval bon: error: {numbers}:1: prompt record 1 is not a JSON object (got a number)"),
])
def test_prm_and_eval_user_errors_are_one_line(capsys, tiny_bert_dir, files, tmp_path, argv, expected):
    fill = lambda text: text.format(bert=tiny_bert_dir, out=tmp_path / "out", **files)  # noqa: E731
    line = one_line_error(capsys, [*map(fill, argv), "--log-level", "warning"])
    assert line.startswith("rewardserve " + fill(expected)), line


@pytest.mark.parametrize("argv", [
    ["train", "rm", "--data", "x.jsonl"], ["train", "dpo", "--data", "x.jsonl"],
    ["train", "ppo", "--prompts", "x.jsonl", "--reward-url", "http://127.0.0.1:9"],
    ["train", "grpo", "--prompts", "x.jsonl"], ["train", "prm", "--data", "x.jsonl"],
])
def test_max_steps_zero_is_refused_not_read_as_unset(capsys, tmp_path, argv):
    with pytest.raises(SystemExit) as stopped:
        main([*argv, "--output", str(tmp_path / "out"), "--max-steps", "0"])
    assert stopped.value.code == 2
    assert "argument --max-steps: must be at least 1, got 0" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_a_prm_threshold_must_be_finite(capsys, tmp_path, value):
    with pytest.raises(SystemExit) as stopped:
        main(["eval", "prm", "--model", "x", "--data", "x.jsonl", "--report", str(tmp_path / "r"),
              f"--threshold={value}"])
    assert stopped.value.code == 2 and f"must be a finite number, got '{value}'" in capsys.readouterr().err


def test_the_kl_estimator_help_names_every_estimator():
    from training.rl_math import KL_ESTIMATORS

    train = next(a for a in build_parser()._actions if a.dest == "command").choices["train"]
    ppo = next(a for a in train._actions if a.dest == "trainer").choices["ppo"]
    (action,) = [a for a in ppo._actions if a.dest == "kl_estimator"]
    assert all(name in action.help for name in KL_ESTIMATORS), action.help


# ------------------------------------------------------------------------- a loss that turns NaN (injected)


def nan_loss(real):
    """`real` (a loss function or a step: (loss, metrics) out) with its loss turned NaN: fault injection."""
    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics
    return poisoned


@pytest.mark.parametrize("trainer", ["rm", "dpo", "ppo", "grpo", "prm"])
def test_a_nan_loss_stops_every_trainer_with_one_line_and_no_export(capsys, monkeypatch, tiny_bert_dir,
                                                                    tiny_llama_lm_dir, files, tmp_path, trainer):
    import training.dpo
    import training.grpo
    import training.ppo
    import training.prm
    import training.rm

    module, name, argv = {
        "rm": (training.rm, "bradley_terry_loss", ["--base", str(tiny_bert_dir), "--data", str(files["pairs"]),
                                                   "--max-length", "32"]),
        "dpo": (training.dpo, "dpo_loss", ["--policy", str(tiny_llama_lm_dir), "--data", str(files["pairs"]),
                                           "--max-length", "32"]),
        "ppo": (training.ppo, "ppo_step", ["--policy", str(tiny_llama_lm_dir), "--prompts", str(files["strings"]),
                                           "--reward-model", str(tiny_bert_dir), "--mini-batch-size", "2",
                                           "--ppo-epochs", "1", "--max-new-tokens", "3"]),
        "grpo": (training.grpo, "grpo_step", ["--policy", str(tiny_llama_lm_dir), "--prompts", str(files["strings"]),
                                             "--reward-weights", "format=1", "--format-pattern", ".*",
                                             "--group-size", "2", "--mini-batch-size", "4", "--max-new-tokens", "3"]),
        "prm": (training.prm, "prm_loss", ["--base", str(tiny_bert_dir), "--data", str(files["steps"]),
                                           "--max-length", "32"]),
    }[trainer]
    monkeypatch.setattr(module, name, nan_loss(getattr(module, name)))
    out = tmp_path / "out"
    line = one_line_error(capsys, ["train", trainer, *argv, "--output", str(out), "--max-steps", "2",
                                   "--batch-size", "2", *QUIET])
    assert line.startswith(f"rewardserve train {trainer}: error: step 1: the loss is nan (not finite); stopped before "
                           "the optimizer step, no model exported"), line
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


def test_a_misspelled_shipped_model_is_named_with_the_shipped_ones():
    from rewardmodel.modeling import resolve_model

    with pytest.raises(FileNotFoundError, match=r"model directory 'defualt' does not exist \(did you mean 'default'\? "
                                                r"shipped models: default, helpful, ensemble, minilm, smollm2\)"):
        resolve_model("defualt")


def test_ctrl_c_is_one_line_with_the_step_and_exit_130(capsys, monkeypatch, tmp_path):
    import training.rm
    from training.types import TrainingInterrupted

    def interrupted(args):
        raise TrainingInterrupted(7, 300, 5)

    monkeypatch.setattr(training.rm, "main", interrupted)
    assert main(["train", "rm", "--data", "x.jsonl", "--output", str(tmp_path / "out"), *QUIET]) == 130
    err = capsys.readouterr().err
    assert err.strip() == ("rewardserve train rm: interrupted at step 7 of 300 (the last checkpoint is step 5): "
                           "continue with --resume"), err

    def before_the_loop(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(training.rm, "main", before_the_loop)
    assert main(["train", "rm", "--data", "x.jsonl", "--output", str(tmp_path / "out"), *QUIET]) == 130
    err = capsys.readouterr().err
    assert err.startswith("rewardserve train rm: interrupted") and "Traceback" not in err and len(err.splitlines()) == 1


def test_eval_rm_cuts_where_the_model_does_by_default(tmp_path):
    import inspect

    from training.evaluate import eval_rm

    args = build_parser().parse_args(["eval", "rm", "--model", "m", "--data", "d", "--report", str(tmp_path)])
    assert args.max_length == 0  # 0: the model's own limit, as training and serving (not an extra cap of 512)
    assert inspect.signature(eval_rm).parameters["max_length"].default == 0


@pytest.mark.parametrize("argv,said", [(["serve", "--max-queu", "10"], "unrecognized arguments: --max-queu 10"),
                                       (["train", "rm", "--dat", "x", "--output", "y"], "required: --data")])
def test_a_flag_is_taken_only_as_spelled(argv, said, capsys):
    """argparse would read a typo's prefix as the flag it starts: `--max-queu 10` set max_queue."""
    from rewardserve.cli import build_parser

    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(argv)
    assert exit_.value.code == 2 and said in capsys.readouterr().err
