"""Best-of-N with the in-process vLLM generator (`--generator vllm:PATH`, vllm-cpu, eager, one engine for the
module): candidates best first over HTTP and gRPC, rewards equal to /v1/score, seeds reproduce, a deadline
aborts the generation inside the engine."""

from __future__ import annotations

import os
import time

import grpc
import httpx
import pytest

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from tests.helpers import LiveServer, test_config

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(900)]  # vLLM starts slowly on a busy CPU

ATOL = 1e-5
PROMPT = "Write a haiku about the sea."


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_policy_dir, tmp_path_factory):
    pytest.importorskip("vllm")
    cache = tmp_path_factory.mktemp("vllm-cache")
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CACHE_ROOT": str(cache),
           "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor")}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    config = test_config(tiny_llama_dir, model_name="bon-rm", generator=f"vllm:{tiny_policy_dir}", max_n=8,
                         max_new_tokens=512, generator_max_model_len=1024)
    try:
        with LiveServer(config) as live:
            yield live
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def best_of_n(server, **body) -> httpx.Response:
    return httpx.post(server.http_url + "/v1/best-of-n", json=body, timeout=120)


def test_vllm_best_of_n_http_and_grpc(server):
    import torch

    assert torch.set_num_threads.__module__ == "torch"  # vLLM's CPU worker's replacement was put back
    r = best_of_n(server, prompt=PROMPT, n=4, max_tokens=16, seed=5)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["generator"].startswith("vllm:")
    candidates = body["candidates"]
    assert [c["rank"] for c in candidates] == [1, 2, 3, 4] and sorted(c["index"] for c in candidates) == [0, 1, 2, 3]
    rewards = [c["reward"] for c in candidates]
    assert rewards == sorted(rewards, reverse=True) and len({c["text"] for c in candidates}) > 1
    assert all(c["finish_reason"] in ("stop", "length") for c in candidates)
    scored = httpx.post(server.http_url + "/v1/score", timeout=60,
                        json={"inputs": [{"prompt": PROMPT, "response": c["text"]} for c in candidates]}).json()
    assert rewards == pytest.approx([s["reward"] for s in scored["scores"]], abs=ATOL)

    assert best_of_n(server, prompt=PROMPT, n=4, max_tokens=16, seed=5).json()["candidates"] == candidates  # seeded
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).BestOfN(
            pb.BestOfNRequest(prompt=PROMPT, n=4, max_tokens=16, seed=5), timeout=120)
    assert [c.text for c in reply.candidates] == [c["text"] for c in candidates]
    assert [c.reward for c in reply.candidates] == pytest.approx(rewards, abs=ATOL)


def test_vllm_consecutive_seeds_give_unrelated_candidates(server):
    """vLLM seeds the i-th of n samples with seed + i: unspread, seeds 6 and 7 would share 3 of 4 candidates."""
    texts = {seed: [c["text"] for c in sorted(best_of_n(server, prompt=PROMPT, n=4, max_tokens=16, seed=seed)
                                               .json()["candidates"], key=lambda c: c["index"])]
             for seed in (6, 7)}
    assert texts[6][1:] != texts[7][:-1] and not set(texts[6]) & set(texts[7])


def test_vllm_messages_and_greedy(server):
    messages = [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
                {"role": "user", "content": PROMPT}]
    r = best_of_n(server, messages=messages, n=3, max_tokens=8, temperature=0)
    assert r.status_code == 200, r.text
    candidates = r.json()["candidates"]
    assert len({c["text"] for c in candidates}) == 1  # greedy: one answer, n times
    scored = httpx.post(server.http_url + "/v1/score", json={"inputs": [
        {"messages": [*messages, {"role": "assistant", "content": candidates[0]["text"]}]}]}).json()
    assert candidates[0]["reward"] == pytest.approx(scored["scores"][0]["reward"], abs=ATOL)


def test_vllm_deadline_aborts_the_generation(server):
    start = time.monotonic()
    r = best_of_n(server, prompt=PROMPT, n=8, max_tokens=500, temperature=1.0, timeout=0.3)
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", r.text
    assert time.monotonic() - start < 3
    quick = best_of_n(server, prompt=PROMPT, n=2, max_tokens=4)  # the aborted request is not in the way
    assert quick.status_code == 200, quick.text


def test_vllm_failed_step_is_502_and_the_engine_goes_on(server):
    engine = server.runtime.bon.generator.engine
    step = engine.step

    def broken_step():  # fault injection: one step raises, as a kernel error would
        engine.step = step
        raise RuntimeError("injected step failure")

    engine.step = broken_step
    try:
        r = best_of_n(server, prompt=PROMPT, n=2, max_tokens=8)
    finally:
        engine.step = step
    assert r.status_code == 502 and "injected step failure" in r.json()["error"]["message"], r.text
    again = best_of_n(server, prompt=PROMPT, n=2, max_tokens=8, seed=1)
    assert again.status_code == 200, again.text
