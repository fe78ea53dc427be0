"""`rewardserve train rm` killed with SIGKILL (a real process, no cleanup of any kind) after it wrote a
checkpoint, then run again with `--resume`: the exported model, the final metrics and the metrics log equal an
uninterrupted run's. Before the resume, half-written checkpoints are planted beside the real ones (newer step
numbers, `latest` pointing at one): none of them may load.

The killed run's steps are slowed down (latency injection in the child process only) so the kill lands in the
middle of the run, with checkpoints still to come.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rewardserve.cli import main
from training import checkpoint as ckpt

pytestmark = pytest.mark.slow  # three training runs, one in a subprocess
ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_EVERY = 24, 4
GOOD = ["How do I boil an egg? Simmer it for nine minutes, then cool it in cold water.",
        "What is a prime number? A number greater than one with no divisors but one and itself."]
BAD = ["Ugh, whatever.", "Figure it out yourself."]
FLAGS = ["--max-steps", str(STEPS), "--save-every", str(SAVE_EVERY), "--keep-checkpoints", "3", "--max-length", "64",
         "--batch-size", "4", "--lr", "1e-3", "--warmup-ratio", "0.1", "--threads", "1", "--log-every", "2",
         "--eval-every", "8", "--no-progress", "--log-level", "warning"]
SLOW_CHILD = """
import sys, time
import training.rm
real_step = training.rm.rm_step
def slow_step(model, batch, **kwargs):
    if model.training:
        time.sleep(0.25)  # latency injection: the kill must land mid-run
    return real_step(model, batch, **kwargs)
training.rm.rm_step = slow_step
from rewardserve.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kill-prefs")
    pairs = [{"prompt": f"Question {i}?", "chosen": GOOD[i % 2], "rejected": BAD[i % 2]} for i in range(24)]
    for name, rows in (("train", pairs[:16]), ("eval", pairs[16:])):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in rows))
    return root


def args(base: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "rm", "--base", str(base), "--data", str(data / "train.jsonl"), "--eval",
            str(data / "eval.jsonl"), "--output", str(out), *FLAGS, *extra]


def wait_for_checkpoint(proc: subprocess.Popen, root: Path, step: int, timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        latest = ckpt.find_latest(root) if root.is_dir() else None
        if latest is not None and ckpt.step_of(latest) >= step:
            return
        assert proc.poll() is None, f"training exited ({proc.returncode}) before step {step}: {proc.stderr.read()}"
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint of step {step} within {timeout} s")


def plant_half_written(root: Path) -> None:
    """The next checkpoints the run would have written, each damaged as a crash would leave it, and holding
    different weights, so that loading one would change the result (or fail)."""
    real = ckpt.find_latest(root)
    reached = ckpt.step_of(real)
    weights = {k: v + 1.0 for k, v in load_file(str(real / "model.safetensors")).items()}
    never_committed = root / ckpt.checkpoint_name(reached + SAVE_EVERY)  # renamed into place, manifest missing
    shutil.copytree(real, never_committed)
    (never_committed / ckpt.MANIFEST).unlink()
    save_file(weights, str(never_committed / "model.safetensors"))
    truncated = root / ckpt.checkpoint_name(reached + 2 * SAVE_EVERY)  # manifest there, a file cut short
    shutil.copytree(real, truncated)
    blob = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    temp = ckpt.temp_dir(root, ckpt.checkpoint_name(reached + 3 * SAVE_EVERY))  # a write in progress
    shutil.copytree(real, temp)
    save_file(weights, str(temp / "model.safetensors"))
    (root / ckpt.LATEST).write_text(truncated.name + "\n")  # the pointer names a damaged one
    for planted in (never_committed, truncated):
        assert ckpt.verify(planted) is not None
    assert ckpt.find_latest(root) == real


def untimed(row: dict) -> dict:
    return {k: v for k, v in row.items() if not k.startswith("time/")}


def log_rows(run: Path) -> list[dict]:
    return [untimed(json.loads(line)) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_sigkilled_training_resumes_to_the_same_model(tiny_bert_dir, data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args(tiny_bert_dir, data, straight)) == 0

    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *args(tiny_bert_dir, data, killed)], cwd=ROOT,
                            env=dict(os.environ), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_checkpoint(proc, killed / "checkpoints", 2 * SAVE_EVERY)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    root = killed / "checkpoints"
    reached = ckpt.step_of(ckpt.find_latest(root))
    assert 2 * SAVE_EVERY <= reached <= STEPS - 3 * SAVE_EVERY  # killed mid-run ...
    assert not (killed / "config.json").exists()  # ... before any export
    plant_half_written(root)

    assert main(args(tiny_bert_dir, data, killed, "--resume")) == 0

    want, got = load_file(str(straight / "model.safetensors")), load_file(str(killed / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        assert torch.allclose(got[key], want[key], atol=1e-6, rtol=0), key
    summary = {run: json.loads((run / "training_config.json").read_text()) for run in (straight, killed)}
    assert summary[killed]["steps"] == summary[straight]["steps"] == STEPS
    for part in ("final_eval_metrics", "final_train_metrics"):
        got, want = (untimed(summary[run][part]) for run in (killed, straight))
        assert got == pytest.approx(want, abs=1e-6), part
    got_rows, want_rows = log_rows(killed), log_rows(straight)
    assert [r["step"] for r in got_rows] == [r["step"] for r in want_rows]
    for g, w in zip(got_rows, want_rows):
        assert g == pytest.approx(w, abs=1e-6)
    assert ckpt.find_latest(root).name == ckpt.checkpoint_name(STEPS)
    assert ckpt.verify(root / ckpt.checkpoint_name(STEPS)) is None  # the stale temp folder did not leak in
