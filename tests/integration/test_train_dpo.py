"""`rewardserve train dpo` end to end on a tiny Llama policy (built from a config, SmolLM2 tokenizer) and synthetic
polite-vs-rude pairs: it learns, exports a plain causal-LM checkpoint, resumes exactly, and runs with LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from rewardserve.cli import main
from tests.helpers import dies_at_call
from tests.integration.test_train_rm import synthetic_pairs
from training import checkpoint as ckpt
from training.curves import plot
from training.data import load_preferences
from training.dpo import DPOConfig, tokenize_pairs, train_dpo
from training.loop import LoraSettings, TrainConfig
from training.policy import load_policy

torch.set_num_threads(1)

FLAGS = ["--max-steps", "12", "--max-length", "96", "--batch-size", "4", "--lr", "3e-3", "--beta", "0.5", "--threads", "1",
         "--log-every", "3", "--eval-every", "6", "--save-every", "6", "--no-progress", "--log-level", "warning"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo-prefs")
    for name, n, seed in (("train", 24, 0), ("eval", 8, 1)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in synthetic_pairs(n, seed)))
    return root


def dpo_args(policy, data, out, *extra: str) -> list[str]:
    return ["train", "dpo", "--policy", str(policy), "--data", str(data / "train.jsonl"), "--eval",
            str(data / "eval.jsonl"), "--output", str(out), *FLAGS, *extra]


@pytest.fixture(scope="module")
def trained(tiny_llama_lm_dir, data, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo-run")
    assert main(dpo_args(tiny_llama_lm_dir, data, out)) == 0
    return out


def test_dpo_learns_and_exports_a_plain_causal_lm(trained, tmp_path):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json", "training_config.json"):
        assert (trained / name).is_file(), name
    rows = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [r["step"] for r in evals] == [6, 12]
    assert evals[-1]["eval/accuracy"] >= 0.75 and evals[-1]["eval/margin"] > 0
    train_rows = [r for r in rows if "train/loss" in r]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert {"train/reward_chosen", "train/reward_rejected", "train/logps_chosen", "train/margin"} <= set(train_rows[0])
    summary = json.loads((trained / "training_config.json").read_text())
    assert summary["steps"] == 12 and summary["export_check_max_abs_diff"] < 1e-4
    assert summary["dpo"]["loss_type"] == "sigmoid" and summary["dpo"]["beta"] == 0.5

    model = AutoModelForCausalLM.from_pretrained(trained)  # plain transformers, chat template kept
    tokenizer = AutoTokenizer.from_pretrained(trained)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "How do I boil an egg?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]

    # the curves docs/training.md shows, from metrics.jsonl
    plot(trained / "metrics.jsonl", tmp_path / "curves.png", ["train/loss", "eval/accuracy", "eval/margin"])
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prompt_tokens_are_masked_out_for_every_format(tiny_llama_lm_dir):
    tokenizer = load_policy(str(tiny_llama_lm_dir))[1]
    hh = {"chosen": "\n\nHuman: Hi there\n\nAssistant: Hello! How can I help?",
          "rejected": "\n\nHuman: Hi there\n\nAssistant: Go away."}
    explicit = {"prompt": "Hi there", "chosen": "Hello! How can I help?", "rejected": "Go away."}
    conversational = {"prompt": [{"role": "user", "content": "Hi there"}],
                      "chosen": [{"role": "assistant", "content": "Hello! How can I help?"}],
                      "rejected": [{"role": "assistant", "content": "Go away."}]}
    items = tokenize_pairs(tokenizer, load_preferences([hh, explicit, conversational]), max_length=256)
    assert items[0] == items[1] == items[2]  # one conversation, three spellings
    item = items[0]
    assert tokenizer.decode(item.chosen) == "Hello! How can I help?<|im_end|>\n"
    assert tokenizer.decode(item.rejected) == "Go away.<|im_end|>\n"
    assert tokenizer.decode(item.prompt).endswith("<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n")
    short = tokenize_pairs(tokenizer, load_preferences([hh]), max_length=12)[0]  # the prompt loses its start first
    assert len(short.prompt) + len(short.chosen) <= 12 and short.prompt == item.prompt[-len(short.prompt):]


def test_a_killed_dpo_run_resumes_to_the_same_model(trained, tiny_llama_lm_dir, data, tmp_path, monkeypatch):
    import training.dpo

    real_step = training.dpo.dpo_step
    monkeypatch.setattr(training.dpo, "dpo_step", dies_at_call(real_step, 9))
    assert main(dpo_args(tiny_llama_lm_dir, data, tmp_path)) == 130  # Ctrl-C: one line naming the step, no traceback
    monkeypatch.setattr(training.dpo, "dpo_step", real_step)
    assert not (tmp_path / "config.json").exists()
    assert ckpt.find_latest(tmp_path / "checkpoints").name == "step-00000006"

    assert main(dpo_args(tiny_llama_lm_dir, data, tmp_path, "--resume")) == 0
    want, got = load_file(str(trained / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key


def test_lora_with_precomputed_reference(tiny_llama_lm_dir, data, tmp_path):
    config = DPOConfig(
        policy=str(tiny_llama_lm_dir), data=str(data / "train.jsonl"), eval=str(data / "eval.jsonl"), max_length=96,
        beta=0.5, loss_type="ipo", precompute_ref=True,
        train=TrainConfig(output_dir=str(tmp_path), max_steps=4, batch_size=4, lr=1e-2, threads=1, progress=False,
                          log_every=2, lora=LoraSettings(r=4, alpha=8, dropout=0.0)),
    )
    result = train_dpo(config)
    exported = load_file(str(tmp_path / "model.safetensors"))
    assert not any("lora" in key for key in exported)
    base = load_file(str(tiny_llama_lm_dir / "model.safetensors"))
    query = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported[query], base[query])  # the adapters were merged in
    assert {"eval/loss", "eval/accuracy", "eval/margin"} <= set(result.eval_metrics)


@pytest.mark.parametrize("loss_type,extra,keys", [
    ("simpo", ["--beta", "2.0", "--simpo-gamma", "0.5"], {"train/reward_chosen", "train/accuracy", "eval/margin"}),
    ("orpo", ["--orpo-lambda", "0.5"], {"train/nll", "train/log_odds_ratio", "eval/log_odds_chosen"}),
    ("kto", ["--beta", "0.5", "--undesirable-weight", "1.2"], {"train/kl", "train/reward_chosen", "eval/margin"}),
])
def test_the_dpo_family_trains_from_the_cli(tiny_llama_lm_dir, data, tmp_path, monkeypatch, loss_type, extra, keys):
    """SimPO and ORPO load no reference model; KTO splits every pair into a desirable and an undesirable example.
    Each learns to prefer the polite completions of the synthetic pairs (eval margin up from the start)."""
    import training.dpo

    if loss_type in ("simpo", "orpo"):
        def no_reference(*args, **kwargs):
            raise AssertionError("a reference model was loaded")

        monkeypatch.setattr(training.dpo, "policy_and_reference", no_reference)
    flags = ["--max-steps", "8", "--eval-every", "4", "--log-every", "4", "--lr", "3e-3", "--loss-type", loss_type]
    assert main(dpo_args(tiny_llama_lm_dir, data, tmp_path, *flags, *extra)) == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert keys <= set().union(*rows), sorted(set().union(*rows))
    evals = [r for r in rows if "eval/margin" in r]
    assert [r["step"] for r in evals] == [4, 8] and evals[-1]["eval/margin"] > 0
    summary = json.loads((tmp_path / "training_config.json").read_text())
    assert summary["dpo"]["loss_type"] == loss_type and summary["export_check_max_abs_diff"] < 1e-4
    if loss_type == "kto":
        assert summary["final_train_metrics"]["train/kl"] >= 0.0


def test_the_family_refuses_flags_that_do_not_apply(tiny_llama_lm_dir, data, tmp_path):
    base = {"policy": str(tiny_llama_lm_dir), "data": str(data / "train.jsonl"),
            "train": TrainConfig(output_dir=str(tmp_path), max_steps=1, progress=False)}
    for overrides, why in (({"loss_type": "simpo", "precompute_ref": True}, "no reference"),
                           ({"loss_type": "orpo", "ref": str(tiny_llama_lm_dir)}, "no reference"),
                           ({"loss_type": "kto", "precompute_ref": True}, "does not apply"),
                           ({"loss_type": "kto", "label_smoothing": 0.1}, "does not apply")):
        with pytest.raises(ValueError, match=why):
            train_dpo(DPOConfig(**base, **overrides))
