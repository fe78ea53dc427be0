"""`rewardserve serve --generator vllm:...` as a user runs it, WITHOUT the Makefile's environment: the code sets
what vLLM needs on CPU (an in-process engine, an explicit KV cache), and a KV cache that cannot fit is refused
with a message that says what to change."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from service.generation.vllm_settings import GIB, VllmMemoryError, engine_kwargs, explain_start_failure
from tests.helpers import free_port, wait_ready

MAKEFILE_ENV = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")


def user_env(tmp_path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in MAKEFILE_ENV}
    # vLLM's own caches still go to a temporary folder (tests never write to ~/.cache)
    env.update(VLLM_CACHE_ROOT=str(tmp_path / "vllm"), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "inductor"),
               TMPDIR=str(tmp_path))
    return env


def test_engine_kwargs(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    assert engine_kwargs(on_cpu=True, kv_cache_gib=0.5) == {"kv_cache_memory_bytes": GIB // 2}
    assert os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert engine_kwargs(on_cpu=False, kv_cache_gib=0.5) == {}
    with pytest.raises(VllmMemoryError, match="lower --vllm-kv-cache-gib"):
        engine_kwargs(on_cpu=True, kv_cache_gib=10**6)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")  # the user's export wins
    assert engine_kwargs(on_cpu=True, kv_cache_gib=0.5) == {"kv_cache_memory_bytes": 2 * GIB}
    vllm_says = ValueError("Available memory on node 0 (1.0/2.0 GiB) on startup is less than desired CPU memory "
                           "utilization (0.92, 1.8 GiB). On the CPU backend ...")
    assert "lower --vllm-kv-cache-gib" in str(explain_start_failure(vllm_says))


@pytest.mark.vllm
@pytest.mark.slow
def test_serve_with_a_vllm_generator_needs_no_exported_settings(tiny_bert_dir, tiny_policy_dir, tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rewardserve.cli", "serve", "--model", str(tiny_bert_dir), "--port", str(port),
         "--grpc-port", "-1", "--generator", f"vllm:{tiny_policy_dir}", "--log-level", "warning"],
        env=user_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, proc, timeout=600)
        r = httpx.post(url + "/v1/best-of-n", json={"prompt": "hi", "n": 2, "max_tokens": 4, "seed": 1}, timeout=120)
        assert r.status_code == 200, r.text
        assert len(r.json()["candidates"]) == 2
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.vllm
def test_a_kv_cache_that_cannot_fit_is_a_clear_error(tiny_bert_dir, tiny_policy_dir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rewardserve.cli", "serve", "--model", str(tiny_bert_dir), "--port", str(free_port()),
         "--grpc-port", "-1", "--generator", f"vllm:{tiny_policy_dir}", "--vllm-kv-cache-gib", "4000"],
        env=user_env(tmp_path), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "lower --vllm-kv-cache-gib" in proc.stderr and "Traceback" not in proc.stderr
