"""`rewardserve train grpo` end to end on a tiny Llama policy (built from a config, SmolLM2 tokenizer): rewards over
gRPC from a live server (one request per group, the server's prefix tokens saved logged), rule rewards (answer match
against GSM8K-style references, format), all-equal groups (zero advantage, counted, no NaN), exact resume after a
kill, the first update at ratio 1, no reference model at kl_coef 0, and a failing endpoint that stops the run."""

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
from training.grpo import GRPOConfig, load_grpo_prompts, train_grpo
from training.loop import TrainConfig

torch.set_num_threads(1)

PROMPTS = [{"question": f"What is {a} + {b}?", "answer": f"{a} and {b} make {a + b}.\n#### {a + b}"}
           for a, b in ((1, 2), (30, 4), (5, 16), (7, 8))]
STEP_METRICS = ("reward_mean", "reward_std", "zero_std_groups", "zero_std_fraction", "group_reward_std", "entropy",
                "clip_ratio", "ratio", "policy_loss", "response_length", "eos_fraction", "loss")
FLAGS = ["--max-new-tokens", "6", "--batch-size", "2", "--group-size", "4", "--mini-batch-size", "4",
         "--num-iterations", "2", "--lr", "1e-3", "--threads", "1", "--log-every", "1", "--no-progress",
         "--log-level", "warning"]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("grpo-prompts") / "prompts.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    return path


def grpo_args(policy, prompts, out, *extra: str) -> list[str]:
    return ["train", "grpo", "--policy", str(policy), "--prompts", str(prompts), "--output", str(out), *FLAGS, *extra]


def metrics_rows(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_prompts_carry_their_reference_answers(prompts):
    (messages, reference), *_ = load_grpo_prompts(str(prompts))
    assert messages == [{"role": "user", "content": "What is 1 + 2?"}] and reference.endswith("#### 3")
    assert load_grpo_prompts([{"prompt": "Hi"}])[0][1] is None
    assert load_grpo_prompts([{"prompt": "2 + 2?", "reference": 4}])[0][1] == "4"


def test_grpo_with_rewards_over_grpc_from_a_live_server(llama_server, tiny_llama_lm_dir, tiny_llama_dir, prompts,
                                                        tmp_path, monkeypatch):
    import training.grpo_rewards

    seen: list[tuple[list, list]] = []
    real_score = training.grpo_rewards.GroupRemoteReward.score_group

    def recording(self, inputs, step, group):
        rewards = real_score(self, inputs, step, group)
        seen.append((list(inputs), rewards))
        return rewards

    monkeypatch.setattr(training.grpo_rewards.GroupRemoteReward, "score_group", recording)
    metrics_text = lambda: httpx.get(llama_server.http_url + "/metrics").text  # noqa: E731
    before = metric_value(metrics_text(), "rewardserve_requests_total", transport="grpc", code="OK")
    saved_before = metric_value(metrics_text(), "rewardserve_prefix_tokens_saved_total")
    reward = ["--reward-url", f"grpc://{llama_server.grpc_target}", "--reward-metrics-url", llama_server.http_url,
              "--reward-timeout", "30", "--kl-coef", "0.05"]
    assert main(grpo_args(tiny_llama_lm_dir, prompts, tmp_path, *reward, "--max-steps", "2")) == 0

    text = metrics_text()
    assert metric_value(text, "rewardserve_requests_total", transport="grpc", code="OK") - before == 4  # 2 steps x 2 groups
    assert [len(inputs) for inputs, _ in seen] == [4] * 4  # one request per group of G = 4 completions
    for inputs, _ in seen:
        assert len({json.dumps(x["messages"][:-1]) for x in inputs}) == 1  # one prompt per request
        assert inputs[0]["messages"][-1]["role"] == "assistant"
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {f"train/{k}" for k in (*STEP_METRICS, "kl", "kl_rollout", "reward_model")} <= set(row), sorted(row)
        assert all(math.isfinite(v) for v in row.values())
        assert row["train/reward_prefix_tokens_saved"] > 0  # the server computed each group's prompt once
    total_saved = metric_value(text, "rewardserve_prefix_tokens_saved_total") - saved_before
    assert sum(r["train/reward_prefix_tokens_saved"] for r in rows) == pytest.approx(total_saved)
    assert rows[0]["train/kl_rollout"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference

    from training.rewards import LocalReward  # the served scores are the reward model's own

    local = LocalReward(str(tiny_llama_dir))
    for inputs, rewards in seen:
        assert local.score(inputs, 0) == pytest.approx(rewards, abs=1e-4)
    assert rows[0]["train/reward_model"] == pytest.approx(sum(sum(r) for _, r in seen[:2]) / 8, abs=1e-5)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).config.vocab_size > 1000  # a plain causal LM
    summary = json.loads((tmp_path / "training_config.json").read_text())
    assert summary["steps"] == 2 and summary["grpo"]["group_size"] == 4


def test_grpo_with_rewards_over_http_reads_the_servers_metrics_there(llama_server, tiny_llama_lm_dir, prompts,
                                                                      tmp_path):
    reward = ["--reward-url", llama_server.http_url, "--reward-weights", "model=1,answer=0.5"]
    assert main(grpo_args(tiny_llama_lm_dir, prompts, tmp_path, *reward, "--max-steps", "1")) == 0
    (row,) = metrics_rows(tmp_path)
    assert row["train/reward_prefix_tokens_saved"] > 0 and "train/kl" not in row  # kl_coef 0: no reference
    assert row["train/reward_mean"] == pytest.approx(row["train/reward_model"] + 0.5 * row["train/reward_answer"])


def test_all_equal_rewards_give_zero_advantage_and_are_counted(tiny_llama_lm_dir, prompts, tmp_path, monkeypatch):
    """A tiny random policy never writes the answer: every answer reward is 0, the format reward (anything up to
    64 characters) always 1, so every group's rewards are equal. Advantages are 0 (no NaN), the groups are counted,
    and with no KL term nothing moves: the export equals the initial weights. No reference model is loaded."""
    import training.grpo

    def no_reference(*args, **kwargs):
        raise AssertionError("a reference model was loaded at kl_coef 0")

    monkeypatch.setattr(training.grpo, "policy_and_reference", no_reference)
    flags = ["--reward-weights", "answer=1,format=0.5", "--format-pattern", ".{0,64}", "--max-steps", "2"]
    assert main(grpo_args(tiny_llama_lm_dir, prompts, tmp_path, *flags)) == 0
    rows = metrics_rows(tmp_path)
    for row in rows:
        assert row["train/zero_std_groups"] == 2 and row["train/zero_std_fraction"] == 1.0
        assert row["train/reward_answer"] == 0.0 and row["train/reward_format"] == 1.0
        assert row["train/reward_mean"] == 0.5 and row["train/loss"] == 0.0 and row["grad_norm"] == 0.0
        assert all(math.isfinite(v) for v in row.values())
        assert "train/kl" not in row
    want, got = load_file(str(tiny_llama_lm_dir / "model.safetensors")), load_file(str(tmp_path / "model.safetensors"))
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_rule_rewards_score_the_decoded_completions():
    from training.grpo_rewards import GroupRewards, parse_weights

    config = GRPOConfig(prompts="unused", reward_weights="answer=2,format=1", format_pattern=r".*#### \d+",
                        train=TrainConfig(output_dir="unused"))
    rewards = GroupRewards(config)
    groups = [([{"role": "user", "content": "1 + 2?"}], "so 3\n#### 3", ["It is 3.\n#### 3", "#### 4", "three"])]
    total, parts = rewards.score(groups, 1)
    assert parts["answer"].tolist() == [1.0, 0.0, 0.0] and parts["format"].tolist() == [1.0, 1.0, 0.0]
    assert total.tolist() == [3.0, 1.0, 0.0]
    assert parse_weights(None, has_model=True, has_format=False) == {"model": 1.0}
    assert parse_weights(None, has_model=False, has_format=True) == {"answer": 1.0, "format": 1.0}
    with pytest.raises(ValueError, match="no --reward-model"):
        parse_weights("model=1", has_model=False, has_format=False)
    with pytest.raises(ValueError, match="NAME=WEIGHT"):
        parse_weights("answer", has_model=False, has_format=False)
    with pytest.raises(ValueError, match="reference answer"):
        rewards.check_references(["#### 3", None])
    from rewardmodel.rules import UnsafePattern

    with pytest.raises(UnsafePattern):
        GroupRewards(config.model_copy(update={"format_pattern": r"(a+)+"}))


def local_config(policy, prompts, reward_model, out, **overrides) -> GRPOConfig:
    train = {"output_dir": str(out), "max_steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, "save_every": 2,
             "progress": False, "threads": 1}
    base = {"policy": str(policy), "prompts": str(prompts), "reward_model": str(reward_model), "max_new_tokens": 6,
            "group_size": 4, "mini_batch_size": 4, "num_iterations": 2, "kl_coef": 0.05, "missing_eos_penalty": 0.1,
            "overlong_cache": 2, "reward_weights": "model=1,answer=1"}
    train |= overrides.pop("train", {})
    return GRPOConfig(**(base | overrides), train=TrainConfig(**train))


def test_a_killed_grpo_run_resumes_exactly(tiny_llama_lm_dir, tiny_bert_dir, prompts, tmp_path, monkeypatch):
    import training.grpo

    straight = train_grpo(local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path / "straight"))
    real_step = training.grpo.grpo_step
    # 2 iterations x 8 rollouts / 4 per update = 4 updates per step: the 9th is the first of step 3
    monkeypatch.setattr(training.grpo, "grpo_step", dies_at_call(real_step, 9, training_only=False))
    with pytest.raises(KeyboardInterrupt):
        train_grpo(local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path / "killed"))
    monkeypatch.setattr(training.grpo, "grpo_step", real_step)
    latest = ckpt.find_latest(tmp_path / "killed" / "checkpoints")
    assert latest.name == "step-00000002" and json.loads((latest / "extra_state.json").read_text())["calls"] == 2

    resumed = train_grpo(local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path / "killed",
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
    assert any(r["train/kl"] > 0 for r in want_rows) and want_rows[0]["train/reward_answer"] == 0.0


def test_the_first_update_sees_ratio_one(tiny_llama_lm_dir, tiny_bert_dir, prompts, tmp_path):
    """Rollout-time log-probs line up with the training forward (same positions, padding, trimming)."""
    from training.grpo import GRPOItem, build
    from training.grpo_experience import GroupMaker, grpo_step
    from training.grpo_rewards import GroupRewards
    from training.policy import prompt_ids
    from training.ppo import make_generator

    config = local_config(tiny_llama_lm_dir, prompts, tiny_bert_dir, tmp_path, mini_batch_size=3)
    module, tokenizer, _, _ = build(config)
    items = [GRPOItem(m, prompt_ids(tokenizer, m, 256), ref) for m, ref in load_grpo_prompts(str(prompts))]
    maker = GroupMaker(config, make_generator(config, module, tokenizer, tmp_path), GroupRewards(config), tokenizer)
    torch.manual_seed(0)
    exp, metrics = maker.make(module.eval(), items)
    assert len(exp) == 16 and exp.ref_logps is not None and metrics["response_length"] <= 6
    assert exp.advantages.view(4, 4).sum(1).abs().max() < 1e-4  # centred within each group
    for idx in (torch.tensor([0, 1, 2]), torch.tensor([15, 3]), torch.arange(16)):
        for aggregation in ("token", "sequence", "constant"):
            loss, m = grpo_step(module.train(), exp.select(idx), 0.2, None, 0.05, aggregation, 6)
            assert m["ratio"].item() == pytest.approx(1.0, abs=1e-5)
            assert m["clip_ratio"].item() == 0.0 and m["kl"].item() == pytest.approx(0.0, abs=1e-6)
            assert torch.isfinite(loss)


def test_a_failing_reward_endpoint_fails_the_step(tiny_llama_lm_dir, prompts, tmp_path, capsys):
    dead = f"grpc://127.0.0.1:{free_port()}"  # nothing listens there
    flags = ["--reward-url", dead, "--reward-timeout", "3", "--reward-retries", "1", "--max-steps", "2"]
    assert main(grpo_args(tiny_llama_lm_dir, prompts, tmp_path, *flags)) == 2
    err = capsys.readouterr().err
    assert "rewardserve train grpo: error: step 1: reward server" in err and dead in err
    assert not ckpt.has_checkpoints(tmp_path / "checkpoints")


@pytest.mark.vllm
@pytest.mark.slow
def test_grpo_with_in_process_vllm_rollouts(smollm2_tokenizer_dir, tiny_bert_dir, prompts, tmp_path):
    """`--rollout vllm`: G completions per prompt sampled by vLLM in the trainer's process, synced every step.
    Run as a subprocess, as a user runs it, so vLLM's thread binding stays out of the test process."""
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
    args = grpo_args(policy, prompts, out, "--reward-model", str(tiny_bert_dir), "--rollout", "vllm", "--max-steps", "2",
                     "--kl-coef", "0.05")
    proc = subprocess.run([sys.executable, "-m", "rewardserve.cli", *args], env=env, capture_output=True, text=True,
                          check=False, timeout=600, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2] and rows[-1]["train/kl_rollout"] > 0
    assert (out / "model.safetensors").is_file()


def test_grpo_eval_reports_accuracy_with_its_standard_error(tiny_llama_lm_dir, prompts, capsys):
    from training.grpo_eval import main as grpo_eval

    args = ["--policy", str(tiny_llama_lm_dir), "--prompts", str(prompts), "--max-new-tokens", "4", "--threads", "1"]
    assert grpo_eval(args) == 0
    greedy = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert greedy["prompts"] == 4 and greedy["samples"] == 1 and greedy["accuracy"] == 0.0  # a random tiny policy
    assert greedy["accuracy_sem"] == 0.0 and greedy["response_length"] <= 4
    assert grpo_eval([*args, "--samples", "2", "--temperature", "1", "--format-pattern", ".*"]) == 0
    sampled = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert sampled["samples"] == 2 and sampled["format"] == 1.0


def test_arithmetic_prompts_are_seeded_disjoint_and_correct(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from rewardmodel.rules import extract_answer

    script = Path(__file__).resolve().parents[2] / "scripts" / "arithmetic_prompts.py"
    for out in (tmp_path / "a", tmp_path / "b"):
        subprocess.run([sys.executable, str(script), "--out", str(out), "--train", "30", "--heldout", "10", "--ops", "+-*",
                        "--seed", "3"], check=True)
    rows = {name: [json.loads(line) for line in (tmp_path / "a" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("train", "heldout")}
    assert (tmp_path / "a" / "train.jsonl").read_text() == (tmp_path / "b" / "train.jsonl").read_text()  # seeded
    assert len(rows["train"]) == 30 and len(rows["heldout"]) == 10
    assert not {r["question"] for r in rows["train"]} & {r["question"] for r in rows["heldout"]}
    for row in rows["train"] + rows["heldout"]:
        a, op, b = row["question"].split("?")[0].split()[-3:]
        assert extract_answer(row["answer"]) == str(eval(f"{a} {op} {b}"))  # noqa: S307 - our own digits
