"""`rewardserve train rm` / `eval rm` end to end on a tiny BERT RM and 32 synthetic polite-vs-rude pairs.

The checks that matter: the export is a plain transformers checkpoint, and the server scores it exactly as the
training code scored the same weights (training-time rewards are recomputed from the last checkpoint through
the training path: PreferenceCollator batches of 2B rows -> RewardModule -> reward_forward).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from rewardserve.cli import main
from service.engine import RewardEngine
from rewardmodel.modeling import load_reward_model, load_tokenizer, resolve_model
from rewardmodel.normalization import load_stats
from rewardmodel.rendering import encode_input
from tests.helpers import dies_at_call, test_config
from training import checkpoint as ckpt
from training.data import PreferenceCollator, load_preferences
from training.loop import LoraSettings, TrainConfig, add_lora
from training.rm import RewardModule, RMConfig, disable_dropout, train_rm

torch.set_num_threads(1)

QUESTIONS = [
    "How do I boil an egg?", "What is the capital of France?", "Can you recommend a book?", "How do plants grow?",
    "What time zone is Tokyo in?", "How do I tie a tie?", "What is a prime number?", "How far away is the moon?",
]
POLITE = [
    "Sure, I would be glad to help! Here is a short answer. Thank you for asking.",
    "Great question, thanks! Here is a short answer. Happy to help further.",
    "Of course, please find the answer here. I hope this helps!",
    "Thanks for asking. Here is a short answer. Have a lovely day!",
]
RUDE = [
    "Ugh, whatever. Stop bothering me.", "Figure it out yourself, that is a silly question.",
    "No. Go away and do not ask again.", "Why would I care? Leave me alone.",
]
TRAIN_FLAGS = ["--max-steps", "16", "--max-length", "128", "--batch-size", "4", "--lr", "1e-3", "--warmup-ratio", "0.1", "--threads", "1",
               "--log-every", "4", "--eval-every", "8", "--save-every", "8", "--no-progress", "--log-level", "warning"]


def synthetic_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(QUESTIONS), "chosen": rng.choice(POLITE), "rejected": rng.choice(RUDE)} for _ in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    for name, n, seed in (("train", 32, 0), ("eval", 16, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(n, seed)))
    return root


def train_args(base, data, out, *extra: str) -> list[str]:
    return ["train", "rm", "--base", str(base), "--data", str(data / "train.jsonl"), "--eval", str(data / "eval.jsonl"),
            "--output", str(out), *TRAIN_FLAGS, *extra]


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rm-run")
    assert main(train_args(tiny_bert_dir, data, out)) == 0
    return out


def training_time_rewards(base, run_dir, pairs, lora: LoraSettings | None = None, max_length: int = 128) -> torch.Tensor:
    """Rewards (2N,) of the last checkpoint's weights, computed the way training computes them."""
    source = resolve_model(str(base))
    tokenizer = load_tokenizer(source)
    hf_model = load_reward_model(source, torch.float32, "cpu")
    disable_dropout(hf_model)
    module = RewardModule(add_lora(hf_model, lora).get_base_model() if lora else hf_model)
    latest = ckpt.find_latest(run_dir / "checkpoints")
    module.load_state_dict(load_file(str(latest / "model.safetensors")), strict=False)
    batch = PreferenceCollator(tokenizer, max_length)(pairs)  # (2N, T): chosen rows, then rejected rows
    with torch.no_grad():
        return module.train()(batch.input_ids, batch.attention_mask)


async def served_rewards(model_dir, pairs) -> list[float]:
    engine = RewardEngine.from_config(test_config(model_dir, threads=1))
    await engine.start()
    try:
        inputs = [p.chosen_input() for p in pairs] + [p.rejected_input() for p in pairs]
        return [r.reward for r in (await engine.score(inputs)).results]
    finally:
        await engine.stop()


# ------------------------------------------------------------------------------------------------------ tests


def test_the_export_is_a_plain_transformers_checkpoint_that_learned(trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "reward_stats.json", "training_config.json",
                 "metrics.jsonl"):
        assert (trained / name).is_file(), name
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    model = AutoModelForSequenceClassification.from_pretrained(trained)
    assert model.config.num_labels == 1
    assert AutoTokenizer.from_pretrained(trained).model_max_length == 128  # the server truncates where training did
    summary = json.loads((trained / "training_config.json").read_text())
    assert summary["train"]["lr"] == 1e-3 and summary["train"]["max_steps"] == 16
    assert summary["steps"] == 16 and summary["export_check_max_abs_diff"] < 1e-4
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert train_losses[-1] < train_losses[0]
    assert summary["final_eval_metrics"]["eval/accuracy"] >= 0.8  # polite beats rude on held-out pairs


async def test_served_scores_equal_training_time_rewards(trained, tiny_bert_dir, data):
    long_prompt = " ".join(QUESTIONS * 8)  # ~300 tokens: cut from the left at 128, in training and in serving
    pairs = load_preferences(data / "eval.jsonl")
    long_pair = load_preferences([{"prompt": long_prompt, "chosen": POLITE[0], "rejected": RUDE[0]}])
    expected_all = training_time_rewards(tiny_bert_dir, trained, pairs + long_pair).tolist()
    assert await served_rewards(trained, pairs + long_pair) == pytest.approx(expected_all, abs=1e-4)
    n = len(pairs)
    expected = expected_all[:n] + expected_all[n + 1 : 2 * n + 1]  # the eval pairs' rewards, chosen then rejected

    # and plain transformers on the service's token ids, one input at a time
    model = AutoModelForSequenceClassification.from_pretrained(trained).eval()
    tokenizer = AutoTokenizer.from_pretrained(trained)
    inputs = [p.chosen_input() for p in pairs] + [p.rejected_input() for p in pairs]
    with torch.no_grad():
        plain = [model(input_ids=torch.tensor([encode_input(tokenizer, x, 128).input_ids])).logits[0, 0].item()
                 for x in inputs]
    assert plain == pytest.approx(expected, abs=1e-4)

    stats = load_stats(trained)  # mean/std of every eval reward, as the server will normalize with
    assert stats.mean == pytest.approx(float(torch.tensor(expected).mean()), abs=1e-4)
    assert stats.std == pytest.approx(float(torch.tensor(expected).std(unbiased=False)), abs=1e-4)


async def test_lora_is_merged_into_the_export(tiny_bert_dir, data, tmp_path):
    lora = LoraSettings(r=4, alpha=8, dropout=0.0)
    config = RMConfig(
        base=str(tiny_bert_dir), data=str(data / "train.jsonl"), eval=str(data / "eval.jsonl"), max_length=128,
        train=TrainConfig(output_dir=str(tmp_path), max_steps=8, batch_size=4, lr=5e-3, threads=1, progress=False,
                          log_every=4, lora=lora),
    )
    result = train_rm(config)
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert not any("lora" in key or "modules_to_save" in key for key in exported)
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert not torch.equal(exported["classifier.weight"], base["classifier.weight"])  # the head trained in full
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(exported[query], base[query])  # the LoRA update was merged in
    assert result.eval_metrics["eval/accuracy"] >= 0.5

    pairs = load_preferences(data / "eval.jsonl")
    expected = training_time_rewards(tiny_bert_dir, tmp_path, pairs, lora=lora).tolist()  # unmerged adapters
    assert await served_rewards(tmp_path, pairs) == pytest.approx(expected, abs=1e-4)


def test_a_killed_cli_run_resumes_to_the_same_model(trained, tiny_bert_dir, data, tmp_path, monkeypatch):
    import training.rm

    real_step = training.rm.rm_step
    monkeypatch.setattr(training.rm, "rm_step", dies_at_call(real_step, 12))
    assert main(train_args(tiny_bert_dir, data, tmp_path)) == 130  # Ctrl-C: one line naming the step, no traceback
    monkeypatch.setattr(training.rm, "rm_step", real_step)
    assert not (tmp_path / "config.json").exists()  # nothing exported
    assert ckpt.find_latest(tmp_path / "checkpoints").name == "step-00000008"

    assert main(train_args(tiny_bert_dir, data, tmp_path, "--resume")) == 0
    want, got = load_file(str(trained / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key


def test_eval_report(trained, data, tmp_path):
    report_dir = tmp_path / "report"
    assert main(["eval", "rm", "--model", str(trained), "--data", str(data / "eval.jsonl"), "--report",
                 str(report_dir), "--threads", "1", "--log-level", "warning"]) == 0
    report = json.loads((report_dir / "report.json").read_text())
    assert {"accuracy", "ties", "reward_chosen", "reward_rejected", "length", "calibration", "pairs"} <= set(report)
    assert {"mean", "std"} <= set(report["reward_chosen"]) and {"mean", "std"} <= set(report["reward_rejected"])
    assert report["pairs"] == 16 and report["length"]["pearson_reward_vs_tokens"] is not None
    assert sum(b["count"] for b in report["calibration"]["bins"]) == 16 and "ece" in report["calibration"]
    summary = json.loads((trained / "training_config.json").read_text())["final_eval_metrics"]
    assert report["accuracy"] == pytest.approx(summary["eval/accuracy"])
    assert report["reward_chosen"]["mean"] == pytest.approx(summary["eval/reward_chosen"], abs=1e-4)
    for png in ("reward_hist.png", "reward_vs_length.png", "calibration.png"):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (report_dir / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3


def test_train_rm_help_states_the_config_defaults():
    """The `train rm` flags default to None (the config decides); the defaults their help quotes must be the config's."""
    import re

    from rewardserve.cli import build_parser

    def subparser(parser, *names):
        for name in names:
            parser = next(a for a in parser._actions if a.dest in ("command", "trainer")).choices[name]
        return parser

    defaults = {**{k: f.default for k, f in TrainConfig.model_fields.items()},
                **{k: f.default for k, f in RMConfig.model_fields.items()},
                **{f"lora_{k}": f.default for k, f in LoraSettings.model_fields.items()}}
    checked = 0
    for action in subparser(build_parser(), "train", "rm")._actions:
        quoted = re.search(r"\(default ([^;)]+)\)", action.help or "")
        if quoted and action.dest in defaults:
            assert action.default is None, action.dest
            value, expected = quoted.group(1).split()[0], defaults[action.dest]
            if value in ("on", "off"):
                assert expected in ((True,) if value == "on" else (None, False)), action.dest
            else:
                assert float(value) == float(expected), action.dest
            checked += 1
    assert checked >= 10
