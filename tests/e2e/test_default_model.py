"""`rewardserve serve` with no --model serves the shipped default reward model (models/default), trained."""

import json
import os
import signal
import subprocess
import sys

import httpx
import pytest
import torch

from rewardmodel.modeling import (
    OVERLAY_META, default_model_dir, load_reward_model, load_tokenizer, resolve_model, reward_forward,
)
from rewardmodel.rendering import encode_input
from tests.helpers import free_port, wait_ready

INPUTS = [
    {"prompt": "How do I pick a lock to get into my neighbour's house?", "response": "I can't help with that."},
    {"prompt": "How do I pick a lock to get into my neighbour's house?", "response": "Use a tension wrench."},
    {"messages": [{"role": "user", "content": "Thanks for the help!"}, {"role": "assistant", "content": "Anytime."}]},
]

pytestmark = pytest.mark.skipif(not (default_model_dir() / OVERLAY_META).exists(), reason="no shipped default model")


def test_the_shipped_default_is_a_small_overlay_with_its_provenance():
    meta = json.loads((default_model_dir() / OVERLAY_META).read_text())
    assert meta["base"] in ("minilm", "smollm2") and len(meta["base_sha256"]) == 64
    assert "train rm" in meta["trained_with"] and "--head-only" in meta["trained_with"]
    assert sum(f.stat().st_size for f in default_model_dir().iterdir()) < 1_000_000
    assert (default_model_dir() / "reward_stats.json").exists()


def test_serve_without_model_flag_serves_the_trained_default():
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewardserve.cli", "serve", "--port", str(port), "--grpc-port", "-1"],
        env={**os.environ}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, timeout=240)
        listed = httpx.get(url + "/v1/models").json()["data"][0]
        assert listed["id"] == "rewardserve-default"
        dtype = listed["dtype"]  # --dtype auto: bfloat16 on CPUs with native bf16 (AMX, AVX512-BF16), else float32
        body = httpx.post(url + "/v1/score", json={"inputs": INPUTS, "normalize": True}, timeout=120).json()
        served = [s["reward"] for s in body["scores"]]
        assert all(isinstance(s["normalized"], float) for s in body["scores"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    assert "UNTRAINED" not in proc.stderr.read()
    source = resolve_model("default")
    tok, model = load_tokenizer(source), load_reward_model(source, torch.float32, "cpu")
    with torch.no_grad():
        rows = [torch.tensor([encode_input(tok, inp, tok.model_max_length).input_ids]) for inp in INPUTS]
        local = [float(reward_forward(model, ids, torch.ones_like(ids))[0]) for ids in rows]
    if dtype == "float32":
        assert served == pytest.approx(local, abs=1e-4)
    else:  # bf16 matmuls (fp32 residual, norms, softmax, head): within the measured bf16 error (docs/benchmarks.md)
        assert dtype == "bfloat16"
        assert served == pytest.approx(local, abs=0.05)
        assert served[0] > served[1]  # the refusal still wins over the harmful answer
