"""training.loop + training.checkpoint on a toy regression model (CPU, fp32, one thread).

The toy model has dropout and the toy step function draws from python's and numpy's RNGs, so a resume is only
exact when every RNG state, the data position, the optimizer and the scheduler all come back.
"""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from training import checkpoint as ckpt
from training.loop import (
    TrainConfig, TrainingDiverged, TrainingInterrupted, check_output_dir, evaluate, make_accelerator, micro_batches,
    steps_per_epoch, train,
)

torch.set_num_threads(1)

N_ITEMS = 20


class Toy(torch.nn.Module):
    def __init__(self, seed: int, dropout: float = 0.2):
        super().__init__()
        torch.manual_seed(seed)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Dropout(dropout), torch.nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)  # (B,)


def toy_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    x = torch.randn(N_ITEMS, 4, generator=g)  # (N, 4)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.1 * torch.randn(N_ITEMS, generator=g)  # (N,)
    return list(zip(x, y))


def collate(items: list) -> dict[str, torch.Tensor]:
    return {"x": torch.stack([x for x, _ in items]), "y": torch.stack([y for _, y in items])}  # (B, 4), (B,)


def noisy_step(model, batch):
    """MSE with a little noise from python's and numpy's RNGs (so their states matter for exactness)."""
    jitter = 0.01 * random.random() + 0.01 * float(np.random.randn())
    pred = model(batch["x"])  # (B,)
    loss = ((pred - batch["y"] - jitter) ** 2).mean()
    return loss, {"mae": (pred - batch["y"]).abs().mean()}


def plain_step(model, batch):
    pred = model(batch["x"])
    return ((pred - batch["y"]) ** 2).mean(), {}


def config(tmp_path, name: str, **overrides) -> TrainConfig:
    base = dict(
        output_dir=str(tmp_path / name), lr=1e-2, weight_decay=0.01, batch_size=3, grad_accum=2, max_steps=10,
        warmup_steps=2, max_grad_norm=0.5, log_every=1, save_every=3, keep_checkpoints=0, progress=False, seed=7,
    )
    return TrainConfig(**(base | overrides))


def params(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


class Killed(Exception):
    pass


def killed_at(step_fn, call: int):
    """step_fn that dies on its `call`-th training call: a process killed mid-step."""
    calls = {"n": 0}

    def step(model, batch):
        if model.training:
            calls["n"] += 1
            if calls["n"] == call:
                raise Killed(f"simulated kill at training call {call}")
        return step_fn(model, batch)

    return step


def metrics_without_timing(path) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/")} for row in rows]


# ------------------------------------------------------------------------------------------------ data order


def test_micro_batches_cover_the_data_once_in_a_seeded_order():
    epoch0 = micro_batches(N_ITEMS, 3, epoch=0, seed=7)
    assert [len(b) for b in epoch0] == [3] * 6 + [2]  # one process keeps the short last batch
    assert sorted(i for b in epoch0 for i in b) == list(range(N_ITEMS))
    assert micro_batches(N_ITEMS, 3, epoch=0, seed=7) == epoch0  # reproducible
    assert micro_batches(N_ITEMS, 3, epoch=1, seed=7) != epoch0  # reshuffled each epoch
    assert micro_batches(N_ITEMS, 3, epoch=0, seed=8) != epoch0


def test_micro_batches_shard_across_processes():
    r0 = micro_batches(N_ITEMS, 3, epoch=0, seed=7, world=2, rank=0)
    r1 = micro_batches(N_ITEMS, 3, epoch=0, seed=7, world=2, rank=1)
    assert len(r0) == len(r1) == 3  # 20 // 6: the incomplete global batch is dropped (DDP steps together)
    seen = [i for a, b in zip(r0, r1) for i in a + b]
    assert len(seen) == len(set(seen)) == 18
    assert [i for a, b in zip(r0, r1) for i in a + b] == [i for b in micro_batches(N_ITEMS, 6, 0, 7) for i in b][:18]


def test_steps_per_epoch_counts_a_short_last_group():
    assert steps_per_epoch(N_ITEMS, TrainConfig(output_dir="unused", batch_size=3, grad_accum=2)) == 4  # 7 micro-batches


# ---------------------------------------------------------------------------------------------------- resume


def test_resume_after_a_kill_ends_exactly_like_an_uninterrupted_run(tmp_path):
    data = toy_data()
    straight = train(config(tmp_path, "straight"), Toy(0), data, collate, noisy_step, eval_data=data[:7])

    # Steps take 2, 2, 2, 1 micro-batches per epoch; the 14th training call is inside step 8, after the
    # checkpoint at step 6 (save_every=3): the run dies with step 7 done but not saved.
    with pytest.raises(Killed):
        train(config(tmp_path, "killed"), Toy(0), data, collate, killed_at(noisy_step, 14), eval_data=data[:7])
    assert ckpt.find_latest(tmp_path / "killed" / "checkpoints").name == "step-00000006"
    # A fresh process: different initial weights, RNGs elsewhere; everything must come from the checkpoint.
    random.seed(999), np.random.seed(999), torch.manual_seed(999)
    resumed = train(config(tmp_path, "killed", resume=True), Toy(1), data, collate, noisy_step, eval_data=data[:7])

    assert resumed.state.step == straight.state.step == 10
    assert (resumed.state.epoch, resumed.state.step_in_epoch) == (straight.state.epoch, straight.state.step_in_epoch)
    assert resumed.last_loss == pytest.approx(straight.last_loss, abs=1e-6)
    assert torch.allclose(params(resumed.model), params(straight.model), atol=1e-6, rtol=0)
    for key, value in straight.eval_metrics.items():
        assert resumed.eval_metrics[key] == pytest.approx(value, abs=1e-6)
    # metrics.jsonl: the killed run's lines after step 6 are dropped and rewritten; the result is the same log
    got = metrics_without_timing(tmp_path / "killed" / "metrics.jsonl")
    want = metrics_without_timing(tmp_path / "straight" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-6)


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    data = toy_data()
    big = train(config(tmp_path, "big", batch_size=4, grad_accum=1, max_steps=5), Toy(0, 0.0), data, collate, plain_step)
    acc = train(config(tmp_path, "acc", batch_size=2, grad_accum=2, max_steps=5), Toy(0, 0.0), data, collate, plain_step)
    assert torch.allclose(params(big.model), params(acc.model), atol=1e-6, rtol=0)


def test_resume_refuses_a_different_batch_shape_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    data = toy_data()
    train(config(tmp_path, "run", max_steps=3), Toy(0), data, collate, plain_step)
    with pytest.raises(ValueError, match="batch_size"):
        train(config(tmp_path, "run", max_steps=6, batch_size=4, resume=True), Toy(0), data, collate, plain_step)
    with pytest.raises(ValueError, match="--resume"):
        train(config(tmp_path, "run", max_steps=6), Toy(0), data, collate, plain_step)


def test_resume_refuses_a_checkpoint_trained_from_another_model_naming_both(tmp_path):
    data = toy_data()
    (tmp_path / "base_a").mkdir()
    (tmp_path / "base_b").mkdir()
    train(config(tmp_path, "run", max_steps=3), Toy(0), data, collate, plain_step,
          run_config={"base_path": str(tmp_path / "base_a")})
    with pytest.raises(ValueError, match=r"trained from --base .*base_a, this run starts from .*base_b"):
        train(config(tmp_path, "run", max_steps=6, resume=True), Toy(0), data, collate, plain_step,
              run_config={"base_path": str(tmp_path / "base_b")})
    with pytest.raises(ValueError, match=r"--policy .*base_a"):  # the policy trainers' key too
        ckpt._check_same_model({"policy_path": str(tmp_path / "base_a")}, {"policy_path": str(tmp_path / "base_b")},
                               tmp_path)
    # the same folder, however written, resumes
    resumed = train(config(tmp_path, "run", max_steps=6, resume=True), Toy(0), data, collate, plain_step,
                    run_config={"base_path": str(tmp_path / "base_b" / ".." / "base_a")})
    assert resumed.state.step == 6


def test_an_output_that_is_a_file_or_the_base_model_is_refused(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"--output .*afile is a file, not a folder"):
        train(config(tmp_path, "afile"), Toy(0), toy_data(), collate, plain_step)
    (tmp_path / "base").mkdir()
    with pytest.raises(ValueError, match=r"is the model being trained from \(--base .*base\): the export would overwrite"):
        check_output_dir(tmp_path / "x" / ".." / "base", tmp_path / "base")
    check_output_dir(tmp_path / "new", tmp_path / "base")  # another folder: fine


def test_ctrl_c_in_the_loop_says_the_step_and_the_last_checkpoint(tmp_path):
    calls = {"n": 0}

    def ctrl_c_at_call_9(model, batch):  # grad_accum 2: call 9 is in step 5; a checkpoint every 3 steps
        calls["n"] += 1
        if calls["n"] == 9:
            raise KeyboardInterrupt
        return plain_step(model, batch)

    with pytest.raises(TrainingInterrupted) as stopped:
        train(config(tmp_path, "run"), Toy(0), toy_data(), collate, ctrl_c_at_call_9)
    assert (stopped.value.step, stopped.value.total, stopped.value.last_checkpoint) == (4, 10, 3)
    assert str(stopped.value) == ("interrupted at step 4 of 10 (the last checkpoint is step 3): continue with "
                                  "--resume")
    assert isinstance(stopped.value, KeyboardInterrupt)  # still an interrupt for callers that catch those


# ------------------------------------------------------------------------------------------- non-finite values


def poisoned_at(call: int, poison):
    """plain_step whose `call`-th training call returns poison(loss, pred) instead of its loss (fault injection)."""
    calls = {"n": 0}

    def step(model, batch):
        loss, metrics = plain_step(model, batch)
        if model.training:
            calls["n"] += 1
            if calls["n"] == call:
                return poison(loss, model(batch["x"])), metrics
        return loss, metrics

    return step


@pytest.mark.parametrize("poison, what", [
    (lambda loss, pred: loss * float("nan"), "the loss is nan"),
    (lambda loss, pred: loss + float("inf"), "the loss is inf"),
    # a finite loss whose gradient is NaN: d sqrt(z)/dz at z = 0 is infinite, times 0
    (lambda loss, pred: loss + 0 * torch.sqrt((pred * 0).sum()), "the gradient norm is nan"),
])
def test_a_non_finite_loss_or_gradient_stops_the_run_before_the_optimizer_step(tmp_path, poison, what):
    # grad_accum 2: the 5th training call is the FIRST micro-batch of step 3, whose last micro-batch is fine
    model = Toy(0, 0.0)
    run = config(tmp_path, "diverged", save_every=1)
    with pytest.raises(TrainingDiverged, match=rf"^step 3: {what} \(not finite\); stopped before the optimizer step"):
        train(run, model, toy_data(), collate, poisoned_at(5, poison))
    assert torch.isfinite(params(model)).all()  # the poisoned gradients were never applied
    assert ckpt.find_latest(tmp_path / "diverged" / "checkpoints").name == "step-00000002"
    assert [r["step"] for r in metrics_without_timing(tmp_path / "diverged" / "metrics.jsonl")] == [1, 2]


# ----------------------------------------------------------------------------------------- atomic checkpoints


def test_a_crash_while_writing_a_checkpoint_never_loads(tmp_path, monkeypatch):
    data = toy_data()
    cfg = config(tmp_path, "crash", max_steps=4, save_every=2)
    real_save, calls = torch.save, {"n": 0}

    def dying_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:  # the step-2 checkpoint wrote optimizer, scheduler, rng; step 4 dies on its optimizer
            with open(f, "wb") as half:
                half.write(b"\x80\x02half a pickle")
            raise OSError("simulated crash: disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated crash"):
        train(cfg, Toy(0), data, collate, plain_step)
    monkeypatch.setattr(torch, "save", real_save)

    root = tmp_path / "crash" / "checkpoints"
    assert (root / ".tmp-step-00000004" / "optimizer.pt").exists()  # the half-written one is there...
    assert not (root / "step-00000004").exists()
    assert (root / "latest").read_text().strip() == "step-00000002"  # ...but nothing points to it
    assert ckpt.find_latest(root) == root / "step-00000002"

    resumed = train(cfg.model_copy(update={"resume": True}), Toy(1), data, collate, plain_step)
    straight = train(config(tmp_path, "straight", max_steps=4, save_every=2), Toy(0), data, collate, plain_step)
    assert torch.allclose(params(resumed.model), params(straight.model), atol=1e-6, rtol=0)
    assert not (root / ".tmp-step-00000004").exists()  # the stale temp folder was replaced and committed
    assert ckpt.find_latest(root) == root / "step-00000004"


def test_damaged_checkpoints_are_skipped(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        tmp = ckpt.begin(root, ckpt.checkpoint_name(step))
        (tmp / "model.bin").write_bytes(bytes(range(256)) * step)
        ckpt.commit(root, ckpt.checkpoint_name(step))
    assert ckpt.find_latest(root).name == "step-00000002"

    newest = root / "step-00000002" / "model.bin"
    newest.write_bytes(b"\xff" + newest.read_bytes()[1:])  # same size, one byte changed
    assert "sha256" in ckpt.verify(newest.parent)
    assert ckpt.find_latest(root).name == "step-00000001"  # `latest` names a damaged folder: fall back

    (root / "step-00000001" / "manifest.json").unlink()  # never committed
    assert ckpt.verify(root / "step-00000001") is not None
    assert ckpt.find_latest(root) is None

    (root / "latest").write_text("../../etc\n")  # a pointer outside the folder is ignored
    assert ckpt.find_latest(root) is None


def test_commit_prunes_old_checkpoints_and_writes_latest_last(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        tmp = ckpt.begin(root, ckpt.checkpoint_name(step))
        (tmp / "state.json").write_text(json.dumps({"step": step}))
        ckpt.commit(root, ckpt.checkpoint_name(step), keep=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-00000002", "step-00000003"]
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


# ----------------------------------------------------------------------------------------- schedule, logging


def test_warmup_then_cosine_and_the_logs(tmp_path):
    data = toy_data()
    cfg = config(tmp_path, "sched", max_steps=6, warmup_steps=2, lr=1.0, save_every=0)
    train(cfg, Toy(0), data, collate, plain_step, eval_data=data[:5])
    rows = [json.loads(line) for line in (tmp_path / "sched" / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    # the rate each step used: warmup 0, 1/2; then cosine from 1 over 4 steps: 1, cos^2(pi/8), 1/2, sin^2(pi/8)
    expected = [0.0, 0.5, 1.0, np.cos(np.pi / 8) ** 2, 0.5, np.sin(np.pi / 8) ** 2]
    assert lrs == pytest.approx(expected, abs=1e-6)
    assert {"train/loss", "grad_norm", "epoch", "time/step_s"} <= set(rows[0])
    assert rows[-1]["step"] == 6 and "eval/loss" in rows[-1]
    assert list((tmp_path / "sched" / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((tmp_path / "sched" / "checkpoints" / "step-00000006" / "config.json").read_text())
    assert saved["train"]["lr"] == 1.0 and saved["train"]["warmup_steps"] == 2  # the resolved config is saved


def test_warmup_then_constant(tmp_path):
    data = toy_data()
    cfg = config(tmp_path, "const", max_steps=5, warmup_steps=2, lr=0.5, save_every=0, lr_schedule="constant")
    train(cfg, Toy(0), data, collate, plain_step)
    rows = [json.loads(line) for line in (tmp_path / "const" / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows if "lr" in r] == pytest.approx([0.0, 0.25, 0.5, 0.5, 0.5], abs=1e-9)


def test_evaluate_is_an_item_weighted_mean(tmp_path):
    data = toy_data()
    model = Toy(0, 0.0)
    accelerator = make_accelerator(config(tmp_path, "ev"))
    by_threes = evaluate(model, data, collate, plain_step, batch_size=3, accelerator=accelerator)
    with torch.no_grad():
        whole = plain_step(model.eval(), collate(data))[0].item()
    assert by_threes["eval/loss"] == pytest.approx(whole, rel=1e-5)
