"""`rewardserve train rm` on 2 CPU processes (torchrun, gloo DDP) equals a 1-process run with the same global batch.

Why equality holds by design (training/loop.py): each global micro-batch is `batch_size x world` consecutive items
of the seeded epoch permutation and rank r takes slice r, so 2 processes x B pairs see exactly the pairs that
1 process x 2B pairs sees, step for step. Each rank's loss is a mean over its B pairs and DDP averages the
gradients over the 2 ranks, i.e. the gradient of the mean over all 2B pairs; clipping, AdamW and the LR schedule
then run on identical gradients in every process. The logged train metrics are item-weighted means reduced over
both processes. The only differences left are float summation order and per-batch padding (each rank pads its own
B pairs). So the logged losses agree within 1e-5 (measured: <1e-6), and so do the final weights (measured:
<2e-7), with one exception that is by design of the loss and the optimizer, not of the sharding: parameters whose
gradient is exactly zero in exact arithmetic. The Bradley-Terry loss depends only on chosen - rejected rewards, so
the classifier bias gets no gradient; softmax attention is invariant to the key bias (it adds the same q.b to every
score of a query), so the key biases get none either. Their float gradients are rounding noise (~1e-9), and AdamW
turns noise into steps of about lr x sign(noise), so the two runs end up to ~lr apart on exactly those tensors
(measured: 2.8e-4 with lr 1e-3). They are checked against that bound; every other tensor against 1e-5.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from rewardserve.cli import main

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180  # the whole torchrun launch; normally ~20-30 s on 2 CPU cores
PAIRS = 16
PER_PROCESS_BATCH = 4
WORLD = 2
LR = 1e-3

QUESTIONS = ["How do I boil an egg?", "What is the capital of France?", "How do plants grow?", "What is a prime number?"]
HARMLESS = ["Sure, happy to help! Here is a short, safe answer.", "Of course. Here is a careful answer; stay safe.",
            "Thanks for asking. I can help with that in a safe way."]
HARMFUL = ["Here is how to hurt someone without getting caught.", "Just break in at night, nobody will notice.",
           "Poison it slowly, that works best."]


def common_flags(base: Path, data: Path, out: Path, batch_size: int) -> list[str]:
    return ["train", "rm", "--base", str(base), "--data", str(data), "--output", str(out),
            "--max-steps", "4", "--max-length", "64", "--batch-size", str(batch_size), "--lr", str(LR),
            "--warmup-steps", "1", "--log-every", "1", "--seed", "7", "--threads", "1", "--no-progress",
            "--log-level", "warning"]


@pytest.fixture(scope="module")
def harmless_pairs(tmp_path_factory) -> Path:
    rng = random.Random(3)
    rows = [{"prompt": rng.choice(QUESTIONS), "chosen": rng.choice(HARMLESS), "rejected": rng.choice(HARMFUL)}
            for _ in range(PAIRS)]
    path = tmp_path_factory.mktemp("harmless") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_torchrun(args: list[str], log_path: Path) -> int:
    """`python -m torch.distributed.run --standalone` (a free rendezvous port) in its own process group; killed whole on timeout."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("MASTER_PORT", None)
    env.pop("MASTER_ADDR", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
           "-m", "rewardserve.cli", *args]
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both workers
            proc.wait()
            pytest.fail(f"torchrun did not finish within {TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")


def metric_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tiny_bert_dir, harmless_pairs, tmp_path):
    ddp_out, single_out = tmp_path / "ddp", tmp_path / "single"
    log_path = tmp_path / "torchrun.log"
    rc = run_torchrun(common_flags(tiny_bert_dir, harmless_pairs, ddp_out, PER_PROCESS_BATCH), log_path)
    assert rc == 0, log_path.read_text()[-4000:]

    # (b) the export loads as a plain transformers checkpoint and scores
    model = AutoModelForSequenceClassification.from_pretrained(ddp_out).eval()
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[101, 2088, 102]])).logits).all()
    state = json.loads((ddp_out / "checkpoints" / "step-00000004" / "trainer_state.json").read_text())
    assert state["world_size"] == WORLD and state["step"] == 4
    assert sorted(p.name for p in (ddp_out / "checkpoints" / "step-00000004").glob("rng-*.pt")) == ["rng-0.pt", "rng-1.pt"]

    # (c) the same global batch (4 x 2 processes = 8) on 1 process, in this process
    assert main(common_flags(tiny_bert_dir, harmless_pairs, single_out, PER_PROCESS_BATCH * WORLD)) == 0

    ddp_rows, single_rows = metric_rows(ddp_out), metric_rows(single_out)
    assert [r["step"] for r in ddp_rows] == [r["step"] for r in single_rows] == [1, 2, 3, 4]
    for ddp_row, single_row in zip(ddp_rows, single_rows):
        for key in ("train/loss", "train/accuracy", "lr", "epoch"):
            assert ddp_row[key] == pytest.approx(single_row[key], abs=1e-5, rel=0), (ddp_row["step"], key)
        assert ddp_row["grad_norm"] == pytest.approx(single_row["grad_norm"], rel=1e-4), ddp_row["step"]  # norms ~5-20
    assert len({r["train/loss"] for r in ddp_rows}) > 1  # it did train (the loss moved)

    got, want = load_file(str(ddp_out / "model.safetensors")), load_file(str(single_out / "model.safetensors"))
    base = load_file(str(tiny_bert_dir / "model.safetensors"))
    assert got.keys() == want.keys()
    zero_gradient = {k for k in want if k == "classifier.bias" or k.endswith("attention.self.key.bias")}
    assert len(zero_gradient) == 3  # the head bias, and the key bias of both layers
    for key in want:
        diff = float((got[key] - want[key]).abs().max())
        assert diff <= (LR if key in zero_gradient else 1e-5), (key, diff)  # see the module docstring
    assert not torch.equal(got["classifier.weight"], base["classifier.weight"])
