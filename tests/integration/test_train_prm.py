"""`rewardserve train prm` / `eval prm` end to end on tiny models and synthetic stepwise data made here.

The checks that matter: the export is a plain `AutoModelForTokenClassification` checkpoint with rewardserve_prm.json,
and step scores computed the way a server computes them (encode_steps with the exported tokenizer, one plain forward
per example, step_scores at the step ends) equal the trainer's own (training-path batches from the last checkpoint).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification, AutoTokenizer

from rewardmodel.steps import PRMSpec, encode_steps, load_prm_spec, step_scores
from rewardserve.cli import main
from tests.helpers import dies_at_call
from training import checkpoint as ckpt
from training.loop import LoraSettings, TrainConfig
from training.prm import PRMConfig, _prepare_model, train_prm, trainer_step_scores
from training.prm_batch import StepCollator, encode_examples, load_stepwise, pad_id
from training.prm_model import load_base
from rewardmodel.modeling import load_tokenizer, resolve_model

torch.set_num_threads(1)

QUESTIONS = ["How many apples are left?", "What is the total cost?", "How far did she walk?", "How many pens?"]
GOOD = ["First add the two amounts.", "Then multiply by three.", "Subtract what was used.", "That gives the total."]
BAD = ["Oops, wrong, I divided by zero.", "Oops, wrong, made up a number.", "Oops, wrong, skipped a step."]
TRAIN_FLAGS = ["--max-steps", "16", "--max-length", "96", "--batch-size", "4", "--lr", "3e-2", "--threads", "1",
               "--log-every", "4", "--eval-every", "8", "--save-every", "8", "--no-progress", "--log-level", "warning"]


def stepwise(n: int, seed: int) -> list[dict]:
    """Solutions of 2-4 steps; half of them go wrong at a random step and stay wrong (bad steps say so)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(2, 4)
        first_bad = rng.randrange(k) if i % 2 else k
        steps = [rng.choice(GOOD) if j < first_bad else rng.choice(BAD) for j in range(k)]
        out.append({"prompt": rng.choice(QUESTIONS), "completions": steps, "labels": [j < first_bad for j in range(k)]})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("stepwise")
    for name, n, seed in (("train", 48, 0), ("eval", 16, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stepwise(n, seed)))
    return root


def train_args(base, data, out, *extra: str) -> list[str]:
    return ["train", "prm", "--base", str(base), "--data", str(data / "train.jsonl"), "--eval", str(data / "eval.jsonl"),
            "--output", str(out), *TRAIN_FLAGS, *extra]


@pytest.fixture(scope="module")
def trained(tiny_llama_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("prm-run")
    assert main(train_args(tiny_llama_dir, data, out)) == 0
    return out


def training_time_scores(base, run_dir, examples, max_length: int = 96) -> list[torch.Tensor]:
    """Step scores of the last checkpoint's weights, computed the way training computes them (one padded batch)."""
    config = PRMConfig(base=str(base), data="unused", train=TrainConfig(output_dir=str(run_dir)))
    source = resolve_model(str(base))
    tokenizer = load_tokenizer(source)
    module, _ = _prepare_model(config, load_base(source, PRMSpec(), seed=42))
    latest = ckpt.find_latest(run_dir / "checkpoints")
    module.load_state_dict(load_file(str(latest / "model.safetensors")), strict=False)
    items = encode_examples(tokenizer, examples, max_length)
    return trainer_step_scores(module.eval(), StepCollator(pad_id(tokenizer))(items), PRMSpec())


# ------------------------------------------------------------------------------------------------------ tests


def test_the_export_is_a_token_classification_checkpoint_with_its_spec_that_learned(trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "rewardserve_prm.json", "training_config.json",
                 "metrics.jsonl"):
        assert (trained / name).is_file(), name
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    model = AutoModelForTokenClassification.from_pretrained(trained)
    assert type(model).__name__ == "LlamaForTokenClassification" and model.config.num_labels == 2
    assert model.config.id2label == {0: "bad", 1: "good"}
    assert load_prm_spec(trained) == PRMSpec(step_separator="\n", num_labels=2, good_label=1)
    assert AutoTokenizer.from_pretrained(trained).model_max_length == 96  # a server truncates where training did
    summary = json.loads((trained / "training_config.json").read_text())
    assert summary["steps"] == 16 and summary["export_check_max_abs_diff"] < 1e-4
    assert summary["final_eval_metrics"]["eval/step_accuracy"] >= 0.9  # "Oops" steps are bad on held-out data


def test_step_scores_of_encode_steps_and_a_plain_forward_equal_the_trainers(trained, tiny_llama_dir, data):
    examples = load_stepwise(str(data / "eval.jsonl"))
    examples += load_stepwise([{"prompt": " ".join(QUESTIONS * 6), "completions": GOOD[:2] + BAD[:1],
                                "labels": [True, True, False]}])  # ~80 prompt tokens: cut from the left at 96
    expected = training_time_scores(tiny_llama_dir, trained, examples)
    model = AutoModelForTokenClassification.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    spec = load_prm_spec(trained)
    truncated = []
    for ex, want in zip(examples, expected, strict=True):
        enc = encode_steps(tokenizer, ex.prompt, ex.steps, tokenizer.model_max_length, spec.step_separator)
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([enc.input_ids])).logits[0]  # (T, 2)
        got = step_scores(logits[enc.step_ends], spec)
        assert got.tolist() == pytest.approx(want.tolist(), abs=1e-4)
        truncated.append(enc.truncated)
    assert truncated[-1] and not any(truncated[:-1])


def test_a_killed_cli_run_resumes_to_the_same_model(trained, tiny_llama_dir, data, tmp_path, monkeypatch):
    import training.prm

    real_step = training.prm.prm_step
    monkeypatch.setattr(training.prm, "prm_step", dies_at_call(real_step, 12))
    assert main(train_args(tiny_llama_dir, data, tmp_path)) == 130  # Ctrl-C: one line naming the step, no traceback
    monkeypatch.setattr(training.prm, "prm_step", real_step)
    assert not (tmp_path / "config.json").exists()  # nothing exported
    assert ckpt.find_latest(tmp_path / "checkpoints").name == "step-00000008"

    assert main(train_args(tiny_llama_dir, data, tmp_path, "--resume")) == 0
    want, got = load_file(str(trained / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key


def test_lora_is_merged_and_freeze_base_trains_only_the_head(tiny_bert_dir, data, tmp_path):
    def run(out, **kw):
        config = PRMConfig(base=str(tiny_bert_dir), data=str(data / "train.jsonl"), eval=str(data / "eval.jsonl"),
                           max_length=96, train=TrainConfig(output_dir=str(out), max_steps=4, batch_size=4, lr=5e-3,
                                                            threads=1, progress=False, log_every=2, **kw.pop("train", {})),
                           **kw)
        train_prm(config)
        return load_file(str(out / "model.safetensors")), json.loads((out / "training_config.json").read_text())

    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    query = "bert.encoder.layer.0.attention.self.query.weight"
    lora, summary = run(tmp_path / "lora", train={"lora": LoraSettings(r=4, alpha=8, dropout=0.0)})
    assert not any("lora" in k or "modules_to_save" in k for k in lora)
    assert not torch.equal(lora[query], base[query]) and lora["classifier.weight"].shape == (2, 32)
    assert summary["export_check_max_abs_diff"] < 1e-4  # unmerged training-time scores == reloaded merged export
    frozen, summary = run(tmp_path / "frozen", freeze_base=True)
    assert torch.equal(frozen[query], base[query]) and summary["export_check_max_abs_diff"] < 1e-4
    assert load_prm_spec(tmp_path / "frozen") == PRMSpec()


def test_eval_prm_reports_step_accuracy_and_first_error_f1(trained, tiny_llama_dir, data, tmp_path, capsys):
    assert main(["eval", "prm", "--model", str(trained), "--data", str(data / "eval.jsonl"), "--report",
                 str(tmp_path / "r"), "--threads", "1", "--log-level", "warning"]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["examples"] == 16 and report["dropped"] == 0 and report["separator"] == "\n"
    assert report["steps"]["accuracy"] >= 0.9 and report["first_error"]["f1"] > 0.5
    assert report["baseline_all_good"]["first_error"]["f1"] == 0.0
    assert 0.5 < report["baseline_position_auroc"] < 1 and set(report["paired_first_error"]) == {"pairs", "wrong_lower"}
    expected = training_time_scores(tiny_llama_dir, trained, load_stepwise(str(data / "eval.jsonl")))
    labels = [r["labels"] for r in stepwise(16, 1)]
    hits = sum((float(s) > 0) == y for ss, ys in zip(expected, labels) for s, y in zip(ss, ys))
    assert report["steps"]["accuracy"] == pytest.approx(hits / sum(map(len, labels)))
    assert "first-error F1" in capsys.readouterr().out
    # a base without a PRM head: an untrained (seeded) baseline, reported all the same
    assert main(["eval", "prm", "--model", str(tiny_llama_dir), "--data", str(data / "eval.jsonl"), "--report",
                 str(tmp_path / "b"), "--threads", "1", "--log-level", "error"]) == 0


def test_bad_data_is_a_clean_cli_error(tiny_llama_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "labels": [True]}) + "\n")
    assert main(["train", "prm", "--base", str(tiny_llama_dir), "--data", str(bad), "--output", str(tmp_path / "o"),
                 "--max-steps", "1", "--no-progress", "--log-level", "error"]) == 2
    assert f"{bad}:1: stepwise record 1:" in capsys.readouterr().err


def test_step_separator_escapes_from_the_command_line():
    from training.prm import unescape

    assert unescape(r"\n") == "\n" and unescape(r" ки\n") == " ки\n" and unescape(r"a\\n") == "a\\n"


@pytest.mark.slow
def test_a_smollm2_gguf_base_trains_and_exports_a_float_checkpoint(data, tmp_path):
    """The GGUF base is dequantized on load; the export is a plain float checkpoint (one layer kept: fast)."""
    out = tmp_path / "smol"
    assert main(["train", "prm", "--base", "smollm2", "--num-layers", "1", "--freeze-base", "--data",
                 str(data / "train.jsonl"), "--output", str(out), "--max-steps", "2", "--batch-size", "2",
                 "--max-length", "96", "--threads", "1", "--no-progress", "--log-level", "warning"]) == 0
    model = AutoModelForTokenClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 1 and model.config.num_labels == 2
    assert json.loads((out / "training_config.json").read_text())["export_check_max_abs_diff"] < 1e-4
    assert load_prm_spec(out) == PRMSpec()
