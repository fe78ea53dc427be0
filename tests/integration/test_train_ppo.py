"""`rewardserve train ppo` end to end on a tiny Llama policy (built from a config, SmolLM2 tokenizer): rewards over
gRPC from a live server (tiny BERT RM), every metric logged every step, exact resume (KL controller and reward
statistics included), a failing reward endpoint stops the run loudly, and the first PPO update sees ratio 1."""

from __future__ import annotations

import json
import math

import httpx
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from rewardserve.cli import main
from tests.helpers import dies_at_call, free_port, metric_value
from training import checkpoint as ckpt
from training.loop import TrainConfig
from training.ppo import PPOConfig, PPOModule, RewardCallFailed, ppo_step, train_ppo
from training.prompts import load_prompts

torch.set_num_threads(1)

PROMPTS = [
    {"prompt": "How do I boil an egg?"},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Red."}]},
    {"turns": ["Write a haiku about rain.", "Now make it rhyme."]},
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}]},
    {"question": "How far away is the moon?"},
    {"prompt": "Recommend a book."},
]
STEP_METRICS = ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clipfrac", "approx_kl", "value_loss",
                "policy_loss", "explained_variance", "response_length", "eos_fraction", "loss")
FLAGS = ["--max-new-tokens", "6", "--batch-size", "2", "--grad-accum", "2", "--mini-batch-size", "2", "--ppo-epochs", "2",
         "--lr", "1e-3", "--threads", "1", "--log-every", "1", "--no-progress", "--log-level", "warning"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("ppo-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def ppo_args(policy, prompts, out, reward: list[str], *extra: str) -> list[str]:
    return ["train", "ppo", "--policy", str(policy), "--prompts", str(prompts), *reward, "--output", str(out), *FLAGS,
            *extra]


def metrics_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_prompt_formats():
    got = load_prompts(PROMPTS)
    assert got[0] == [{"role": "user", "content": "How do I boil an egg?"}]
    assert got[1] == [{"role": "user", "content": "Name a colour."}]  # the trailing answer is dropped
    assert got[2] == [{"role": "user", "content": "Write a haiku about rain."}]  # MT-Bench: first turn
    assert got[4] == [{"role": "user", "content": "How far away is the moon?"}]
    with pytest.raises(ValueError, match="prompt record 1"):
        load_prompts([{"prompt": "ok"}, {"text": "no known key"}])


def test_ppo_with_rewards_over_grpc_from_a_live_server(bert_server, tiny_llama_lm_dir, tiny_bert_dir, prompts, tmp_path,
                                                         monkeypatch):
    import training.rewards

    seen: list[tuple[list, list]] = []
    real_score = training.rewards.RemoteReward.score

    def recording(self, inputs, step):
        rewards = real_score(self, inputs, step)
        seen.append((list(inputs), rewards))
        return rewards

    monkeypatch.setattr(training.rewards.RemoteReward, "score", recording)
    before = metric_value(httpx.get(bert_server.http_url + "/metrics").text, "rewardserve_requests_total",
                          transport="grpc", code="OK")
    reward = ["--reward-url", f"grpc://{bert_server.grpc_target}", "--reward-timeout", "30"]
    assert main(ppo_args(tiny_llama_lm_dir, prompts, tmp_path, reward, "--max-steps", "3", "--kl-estimator", "k3")) == 0

    after = metric_value(httpx.get(bert_server.http_url + "/metrics").text, "rewardserve_requests_total",
                         transport="grpc", code="OK")
    assert after - before == 3  # one Score call per step, all the step's rollouts in it
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert {f"train/{k}" for k in STEP_METRICS} <= set(row), sorted(set(row))
        assert all(math.isfinite(v) for v in row.values())
    assert rows[0]["train/kl"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
    assert rows[0]["train/response_length"] <= 6 and rows[0]["train/kl_coef"] == pytest.approx(0.05)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))

    # the served scores are the reward model's scores of exactly those prompt + response conversations
    from training.rewards import LocalReward

    local = LocalReward(str(tiny_bert_dir))
    # 6 prompts, 2 x 2 per step: an epoch is a step of 4 rollouts and a short one of 2
    assert [(len(inputs), len(rewards)) for inputs, rewards in seen] == [(4, 4), (2, 2), (4, 4)]
    for inputs, rewards in seen:
        assert inputs[0]["messages"][-1]["role"] == "assistant"
        assert local.score(inputs, 0) == pytest.approx(rewards, abs=1e-4)
    assert rows[0]["train/reward_mean"] == pytest.approx(sum(seen[0][1]) / 4, abs=1e-5)

    model = AutoModelForCausalLM.from_pretrained(tmp_path)  # the export is a plain causal LM
    assert model.config.vocab_size > 1000
    summary = json.loads((tmp_path / "training_config.json").read_text())
    assert summary["steps"] == 3 and summary["ppo"]["kl_estimator"] == "k3"


def test_a_failing_reward_endpoint_fails_the_step(tiny_llama_lm_dir, prompts, tmp_path, capsys):
    dead = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    reward = ["--reward-url", dead, "--reward-timeout", "3", "--reward-retries", "1"]
    assert main(ppo_args(tiny_llama_lm_dir, prompts, tmp_path, reward, "--max-steps", "2")) == 2
    err = capsys.readouterr().err
    assert "rewardserve train ppo: error: step 1: reward server" in err and dead in err
    assert not (tmp_path / "config.json").exists() and not ckpt.has_checkpoints(tmp_path / "checkpoints")
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()

    config = PPOConfig(policy=str(tiny_llama_lm_dir), prompts=str(prompts), reward_url=dead, reward_timeout=3,
                       reward_retries=0, max_new_tokens=4,
                       train=TrainConfig(output_dir=str(tmp_path / "api"), max_steps=1, batch_size=2, progress=False))
    with pytest.raises(RewardCallFailed, match="unavailable|UNAVAILABLE"):
        train_ppo(config)


def local_config(policy, prompts, reward_model, out, **overrides) -> PPOConfig:
    train = {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "grad_accum": 2, "lr": 1e-3, "log_every": 1,
             "save_every": 2, "progress": False, "threads": 1}
    base = {"policy": str(policy), "prompts": str(prompts), "reward_model": str(reward_model), "max_new_tokens": 6,
            "mini_batch_size": 2, "ppo_epochs": 2, "adaptive_kl": True, "kl_target": 0.5, "kl_horizon": 20,
            "normalize_rewards": True, "missing_eos_penalty": 0.5, "reward_clip": 3.0}
    train |= overrides.pop("train", {})
    return PPOConfig(**(base | overrides), train=TrainConfig(**train))


def test_a_killed_ppo_run_resumes_exactly(tiny_llama_lm_dir, tiny_bert_dir, prompts, tmp_path, monkeypatch):
    import training.ppo_experience as experience

    straight = train_ppo(local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path / "straight"))
    real_step = experience.ppo_step
    # 4 updates per step: the 9th is the first update of step 3, after the step-2 checkpoint
    dies_in_step_3 = dies_at_call(real_step, 9, training_only=False)

    import training.ppo

    monkeypatch.setattr(training.ppo, "ppo_step", dies_in_step_3)
    with pytest.raises(KeyboardInterrupt):
        train_ppo(local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path / "killed"))
    monkeypatch.setattr(training.ppo, "ppo_step", real_step)
    latest = ckpt.find_latest(tmp_path / "killed" / "checkpoints")
    assert latest.name == "step-00000002" and json.loads((latest / "extra_state.json").read_text())["calls"] == 2

    resumed = train_ppo(local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path / "killed",
                                     train={"resume": True}))
    assert resumed.steps == straight.steps == 4
    want = load_file(str(tmp_path / "straight" / "model.safetensors"))
    got = load_file(str(tmp_path / "killed" / "model.safetensors"))
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key
    got_rows, want_rows = metrics_rows(tmp_path / "killed"), metrics_rows(tmp_path / "straight")
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows] == [1, 2, 3, 4]
    for g, w in zip(got_rows, want_rows):
        assert {k: v for k, v in g.items() if not k.startswith("time/")} == pytest.approx(
            {k: v for k, v in w.items() if not k.startswith("time/")}, abs=1e-6)
    kl_coefs = [r["train/kl_coef"] for r in metrics_rows(tmp_path / "straight")]
    assert kl_coefs[0] == pytest.approx(0.05) and kl_coefs[-1] != kl_coefs[0]  # the adaptive controller moved


def test_the_first_update_sees_ratio_one(tiny_llama_lm_dir, tiny_bert_dir, prompts, tmp_path):
    """Rollout-time log-probs and values line up with the training forward (same positions, padding, trimming)."""
    from training.ppo import build, make_generator
    from training.ppo_experience import ExperienceMaker
    from training.prompts import tokenize_prompts
    from training.rewards import LocalReward

    config = local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path, mini_batch_size=3)
    module, tokenizer, _, _ = build(config)
    assert isinstance(module, PPOModule)
    items = tokenize_prompts(tokenizer, load_prompts(str(prompts)), config.max_prompt_length)
    maker = ExperienceMaker(config, make_generator(config, module, tokenizer, tmp_path), LocalReward(str(tiny_bert_dir)),
                            tokenizer)
    torch.manual_seed(0)
    exp, metrics = maker.make(module.eval(), items)
    assert len(exp) == 6 and metrics["response_length"] <= 6
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([5, 3]), torch.arange(6)):
        loss, m = ppo_step(module.train(), exp.select(idx), cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
        assert m["ratio"].item() == pytest.approx(1.0, abs=1e-5)
        assert m["approx_kl"].item() == pytest.approx(0.0, abs=1e-8) and m["clipfrac"].item() == 0.0
        assert m["vf_clipfrac"].item() == 0.0 and torch.isfinite(loss)


@pytest.mark.vllm
@pytest.mark.slow
def test_ppo_with_in_process_vllm_rollouts_stays_in_sync(smollm2_tokenizer_dir, tiny_bert_dir, prompts, tmp_path):
    """`--rollout vllm`: vLLM (CPU build, in the trainer's process) samples every step from the current policy.
    Its own log-probs of what it sampled equal the policy's (generator_logprob_gap) at every step, while the
    policy moves away from its start (kl > 0): the weights were loaded into vLLM each step. Run as a subprocess,
    as a user runs it, so vLLM's thread binding stays out of the test process."""
    import importlib.util
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import make_tiny_llama_lm

    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vllm is not installed")
    policy = make_tiny_llama_lm(tmp_path / "policy", smollm2_tokenizer_dir, hidden_size=64, heads=2)  # head_dim 32
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = os.environ | {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CACHE_ROOT": str(scratch / "vllm"), "TMPDIR": str(scratch),
                        "TORCHINDUCTOR_CACHE_DIR": str(scratch / "inductor"), "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    out = tmp_path / "run"
    args = ppo_args(policy, prompts, out, ["--reward-model", str(tiny_bert_dir)], "--rollout", "vllm", "--max-steps", "3")
    proc = subprocess.run([sys.executable, "-m", "rewardserve.cli", *args], env=env, capture_output=True, text=True, check=False,
                          timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["train/generator_logprob_gap"] < 1e-3 for r in rows), [r["train/generator_logprob_gap"] for r in rows]
    assert rows[-1]["train/kl"] > 1e-3
    assert (out / "rollout-model" / "config.json").is_file() and (out / "model.safetensors").is_file()


def test_merged_weights_for_the_generator_equal_a_merged_lora_model(tiny_llama_lm_dir):
    """What vLLM is given each step: plain checkpoint names, LoRA deltas merged, no adapter tensors."""
    import copy

    from training.loop import LoraSettings, add_lora
    from training.policy import load_policy
    from training.rollout import merged_weights

    policy = load_policy(str(tiny_llama_lm_dir))[0]
    plain_names = [n for n, _ in policy.named_parameters()]
    peft_model = add_lora(policy, LoraSettings(r=4, alpha=8, dropout=0.0), task_type="CAUSAL_LM")
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # B = 0 at init would make the deltas vanish
    got = dict(merged_weights(peft_model.get_base_model()))
    want = dict(copy.deepcopy(peft_model).merge_and_unload().named_parameters())
    assert list(got) == plain_names == list(want)
    for name, value in want.items():
        torch.testing.assert_close(got[name], value.detach(), atol=1e-6, rtol=0)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(got[q], peft_model.get_base_model().model.layers[0].self_attn.q_proj.base_layer.weight)


def test_policy_eval_scores_sampled_responses(tiny_llama_lm_dir, tiny_bert_dir, prompts, capsys):
    from training.policy_eval import main as policy_eval

    args = ["--policy", str(tiny_llama_lm_dir), "--prompts", str(prompts), "--reward-model", str(tiny_bert_dir),
            "--samples", "2", "--max-new-tokens", "4", "--seed", "3", "--threads", "1"]
    assert policy_eval(args) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["rollouts"] == 2 * len(PROMPTS) and first["response_length"] <= 4
    assert math.isfinite(first["reward_mean"]) and first["reward_sem"] > 0
    assert policy_eval(args) == 0  # same seed, same responses, same rewards
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["reward_mean"] == first["reward_mean"]
