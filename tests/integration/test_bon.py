"""Best-of-N and rerank over HTTP and gRPC on a live server: a tiny decoder RM and a tiny policy generating with
transformers (`--generator hf:PATH`). Candidates come back best first, and each reward is exactly what
/v1/score answers for the same (context, text). Limits and generator faults are typed errors, never a hang.
"""

from __future__ import annotations

import time

import grpc
import httpx
import pytest

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from service.generation.openai_compat import OpenAIGenerator
from tests.helpers import LiveServer, free_port, test_config

ATOL = 1e-5
PROMPT = "Name a colour of the sky."
MESSAGES = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a colour of the sky."},
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tiny_policy_dir):
    config = test_config(
        tiny_llama_dir, model_name="bon-rm", generator=f"hf:{tiny_policy_dir}", max_n=8, max_new_tokens=32,
        generator_max_model_len=512, max_inputs_per_request=16,
    )
    with LiveServer(config) as live:
        yield live


@pytest.fixture(scope="module")
def stub(server):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


def post(server, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(server.http_url + path, json=body, timeout=120, **kw)


def scores_of(server, inputs: list[dict]) -> list[float]:
    r = post(server, "/v1/score", {"inputs": inputs})
    assert r.status_code == 200, r.text
    return [s["reward"] for s in r.json()["scores"]]


def check_ranked(candidates: list[dict], n: int) -> None:
    """Best first, ranks 1..n, every index once, rewards non-increasing."""
    assert len(candidates) == n
    assert [c["rank"] for c in candidates] == list(range(1, n + 1))
    assert sorted(c["index"] for c in candidates) == list(range(n))
    rewards = [c["reward"] for c in candidates]
    assert rewards == sorted(rewards, reverse=True)


# ---- best-of-n --------------------------------------------------------------------------------------------
def test_best_of_n_prompt_rewards_equal_score(server):
    r = post(server, "/v1/best-of-n", {"prompt": PROMPT, "n": 4, "max_tokens": 12, "seed": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "bon-rm" and body["generator"].startswith("hf:")
    check_ranked(body["candidates"], 4)
    assert body["best"] == {"text": body["candidates"][0]["text"], "reward": body["candidates"][0]["reward"]}
    assert all(c["finish_reason"] in ("stop", "length") for c in body["candidates"])
    assert len({c["text"] for c in body["candidates"]}) > 1  # sampled, not one answer four times
    expected = scores_of(server, [{"prompt": PROMPT, "response": c["text"]} for c in body["candidates"]])
    assert [c["reward"] for c in body["candidates"]] == pytest.approx(expected, abs=ATOL)
    assert float(r.headers["X-Generation-Time-Ms"]) > 0


def test_best_of_n_messages_rewards_equal_score(server):
    r = post(server, "/v1/best-of-n", {"messages": MESSAGES, "n": 3, "max_tokens": 8, "temperature": 0.8})
    assert r.status_code == 200, r.text
    candidates = r.json()["candidates"]
    check_ranked(candidates, 3)
    conversations = [{"messages": [*MESSAGES, {"role": "assistant", "content": c["text"]}]} for c in candidates]
    assert [c["reward"] for c in candidates] == pytest.approx(scores_of(server, conversations), abs=ATOL)


def test_seed_reproduces_candidates_and_greedy_repeats(server):
    body = {"prompt": PROMPT, "n": 3, "max_tokens": 10, "seed": 11}
    first, second = post(server, "/v1/best-of-n", body).json(), post(server, "/v1/best-of-n", body).json()
    assert first["candidates"] == second["candidates"]
    other = post(server, "/v1/best-of-n", {**body, "seed": 12}).json()
    assert {c["text"] for c in other["candidates"]} != {c["text"] for c in first["candidates"]}
    greedy = post(server, "/v1/best-of-n", {**body, "temperature": 0}).json()["candidates"]
    assert len({c["text"] for c in greedy}) == 1 and [c["index"] for c in greedy] == [0, 1, 2]


def test_grpc_best_of_n_matches_http(server, stub):
    request = pb.BestOfNRequest(prompt=PROMPT, n=4, max_tokens=12, seed=3, request_id="b1")
    reply, call = stub.BestOfN.with_call(request, timeout=120)
    http = post(server, "/v1/best-of-n", {"prompt": PROMPT, "n": 4, "max_tokens": 12, "seed": 3}).json()
    assert reply.request_id == "b1" and reply.model == "bon-rm" and reply.generator == http["generator"]
    assert [c.text for c in reply.candidates] == [c["text"] for c in http["candidates"]]
    assert [c.reward for c in reply.candidates] == pytest.approx([c["reward"] for c in http["candidates"]], abs=ATOL)
    assert [c.rank for c in reply.candidates] == [1, 2, 3, 4] and reply.best == reply.candidates[0]
    assert {key for key, _ in call.trailing_metadata()} >= {"x-generation-time-ms", "x-compute-time-ms"}


def test_grpc_best_of_n_conversation(server, stub):
    conversation = pb.Conversation(messages=[pb.Message(role=m["role"], content=m["content"]) for m in MESSAGES])
    reply = stub.BestOfN(pb.BestOfNRequest(conversation=conversation, n=2, max_tokens=6), timeout=120)
    texts = [c.text for c in reply.candidates]
    expected = scores_of(server, [{"messages": [*MESSAGES, {"role": "assistant", "content": t}]} for t in texts])
    assert [c.reward for c in reply.candidates] == pytest.approx(expected, abs=ATOL)


# ---- rerank ---------------------------------------------------------------------------------------------
def test_rerank_http_and_grpc(server, stub):
    candidates = ["Blue.", "The sky is usually blue on a clear day.", "Green", "Blue."]
    r = post(server, "/v1/rerank", {"prompt": PROMPT, "candidates": candidates})
    assert r.status_code == 200, r.text
    ranked = r.json()["candidates"]
    check_ranked(ranked, 4)
    by_index = {c["index"]: c for c in ranked}
    expected = scores_of(server, [{"prompt": PROMPT, "response": t} for t in candidates])
    assert [by_index[i]["reward"] for i in range(4)] == pytest.approx(expected, abs=ATOL)
    assert [by_index[i]["text"] for i in range(4)] == candidates
    assert by_index[0]["reward"] == by_index[3]["reward"] and by_index[0]["rank"] < by_index[3]["rank"]  # tie: order
    assert all(c["finish_reason"] is None and c["tokens"] > 0 and c["truncated"] is False for c in ranked)

    reply = stub.Rerank(pb.RerankRequest(prompt=PROMPT, candidates=candidates, request_id="r1"), timeout=60)
    assert reply.request_id == "r1"
    assert [(c.index, c.rank, c.text) for c in reply.candidates] == [(c["index"], c["rank"], c["text"]) for c in ranked]
    assert [c.reward for c in reply.candidates] == pytest.approx([c["reward"] for c in ranked], abs=ATOL)


# ---- limits and bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "hi", "n": 9}, 400, "n: 9 is more than this server's max_n=8"),
    ({"prompt": "hi", "max_tokens": 33}, 400, "max_tokens: 33 is more than this server's max_new_tokens=32"),
    ({"prompt": "hi", "n": 0}, 422, "n:"),
    ({"prompt": "hi", "temperature": -1}, 422, "temperature:"),
    ({"prompt": "hi", "top_p": 0}, 422, "top_p:"),
    ({"prompt": "hi", "seed": 2**40}, 422, "seed:"),
    ({"prompt": "hi", "model": "other"}, 404, "unknown model 'other'"),
    ({"n": 2}, 422, "exactly one of 'prompt' or 'messages'"),
    ({"prompt": "hi", "messages": MESSAGES}, 422, "exactly one of 'prompt' or 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, 422,
     "must not be the assistant's"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "messages.0.role"),
    ({"prompt": "hi", "extra": 1}, 422, "extra"),
    # fits the policy's 512 alone, not with the answer asked for: refused, not a silently shorter answer
    ({"prompt": "word " * 495, "max_tokens": 32}, 400, "plus max_tokens=32, is more than the policy takes"),
])
def test_best_of_n_bad_requests(server, body, status, needle):
    r = post(server, "/v1/best-of-n", body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"] and r.json()["error"]["code"] == status


@pytest.mark.parametrize("body,status,needle", [
    ({"prompt": "hi", "candidates": []}, 422, "candidates:"),
    ({"prompt": "hi", "candidates": ["x"] * 17}, 400, "candidates: 17 entries, more than max_inputs_per_request=16"),
    ({"candidates": ["x"]}, 422, "exactly one of"),
    ({"prompt": "hi", "candidates": [1]}, 422, "candidates.0"),
])
def test_rerank_bad_requests(server, body, status, needle):
    r = post(server, "/v1/rerank", body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


def test_prompt_longer_than_the_policy_takes_is_400(server):
    r = post(server, "/v1/best-of-n", {"prompt": "word " * 600, "n": 2, "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt:"), r.text


def test_grpc_bad_requests(stub):
    cases = [
        (pb.BestOfNRequest(prompt="hi", n=9), grpc.StatusCode.INVALID_ARGUMENT, "max_n=8"),
        (pb.BestOfNRequest(prompt="hi", n=0), grpc.StatusCode.INVALID_ARGUMENT, "n:"),
        (pb.BestOfNRequest(n=2), grpc.StatusCode.INVALID_ARGUMENT, "context: set one of prompt or conversation"),
        (pb.BestOfNRequest(prompt="hi", model="other"), grpc.StatusCode.NOT_FOUND, "unknown model"),
    ]
    for request, code, needle in cases:
        with pytest.raises(grpc.RpcError) as err:
            stub.BestOfN(request, timeout=30)
        assert err.value.code() == code and needle in err.value.details(), (request, err.value.details())
    with pytest.raises(grpc.RpcError) as err:
        stub.Rerank(pb.RerankRequest(prompt="hi"), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "candidates" in err.value.details()


# ---- generator faults -----------------------------------------------------------------------------------
class _FailingGenerator:
    """Fault injection: a generator whose every call fails the way a crashed policy would."""

    name = "hf:broken"

    async def generate(self, *args, **kwargs):
        raise RuntimeError("CUDA error: device-side assert triggered")


class swap_generator:
    def __init__(self, server, generator):
        self.bon, self.generator = server.runtime.bon, generator

    def __enter__(self):
        self.original, self.bon.generator = self.bon.generator, self.generator

    def __exit__(self, *exc):
        self.bon.generator = self.original


def test_generator_failure_is_502_and_unavailable(server, stub):
    with swap_generator(server, _FailingGenerator()):
        r = post(server, "/v1/best-of-n", {"prompt": "hi", "n": 2, "max_tokens": 4})
        with pytest.raises(grpc.RpcError) as err:
            stub.BestOfN(pb.BestOfNRequest(prompt="hi", n=2, max_tokens=4), timeout=30)
    assert r.status_code == 502 and r.json()["error"]["type"] == "generator_error", r.text
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert post(server, "/v1/best-of-n", {"prompt": "hi", "n": 2, "max_tokens": 4}).status_code == 200


def test_unreachable_openai_generator_is_502(server):
    dead = OpenAIGenerator(f"http://127.0.0.1:{free_port()}", server.config)  # nothing listens there
    with swap_generator(server, dead):
        r = post(server, "/v1/best-of-n", {"prompt": "hi", "n": 2, "max_tokens": 4})
    assert r.status_code == 502 and "ConnectError" in r.json()["error"]["message"], r.text


class slow_policy:
    """Fault injection: every forward pass of the hf generator's policy takes `delay` seconds longer."""

    def __init__(self, server, delay: float):
        self.model, self.delay = server.runtime.bon.generator.model, delay

    def __enter__(self):
        self.forward = self.model.forward

        def slow(*args, **kwargs):
            time.sleep(self.delay)
            return self.forward(*args, **kwargs)

        self.model.forward = slow

    def __exit__(self, *exc):
        self.model.forward = self.forward


def test_generation_past_the_deadline_is_504_and_stops(server, stub):
    body = {"prompt": "hi", "n": 2, "max_tokens": 32, "timeout": 0.5}
    with slow_policy(server, 0.1):  # 32 tokens take > 3 s
        start = time.monotonic()
        r = post(server, "/v1/best-of-n", body)
        took = time.monotonic() - start
        with pytest.raises(grpc.RpcError) as err:
            stub.BestOfN(pb.BestOfNRequest(prompt="hi", n=2, max_tokens=32), timeout=0.5)
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", r.text
    assert took < 2.0
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # the generation thread stopped at its next token: the next request is served at once
    start = time.monotonic()
    assert post(server, "/v1/best-of-n", {"prompt": "hi", "n": 2, "max_tokens": 4}).status_code == 200
    assert time.monotonic() - start < 10


def test_generation_timeout_applies_without_a_request_deadline(server):
    config = server.runtime.bon.config
    original, config.generation_timeout_s = config.generation_timeout_s, 0.5
    try:
        with slow_policy(server, 0.1):
            r = post(server, "/v1/best-of-n", {"prompt": "hi", "n": 2, "max_tokens": 32})
    finally:
        config.generation_timeout_s = original
    assert r.status_code == 504 and r.json()["error"]["type"] == "deadline_exceeded", r.text
    assert "generation_timeout_s=0.5" in r.json()["error"]["message"]


# ---- clients --------------------------------------------------------------------------------------------
def test_clients_best_of_n_and_rerank(server):
    from clients import AsyncGrpcRewardClient, AsyncRewardClient, GrpcRewardClient, RewardClient

    raw = post(server, "/v1/best-of-n", {"prompt": PROMPT, "n": 3, "max_tokens": 8, "seed": 21}).json()
    expected = [(c["text"], c["rank"], c["index"]) for c in raw["candidates"]]
    rewards = [c["reward"] for c in raw["candidates"]]

    def check(result) -> None:
        assert [(c.text, c.rank, c.index) for c in result.candidates] == expected
        assert [c.reward for c in result.candidates] == pytest.approx(rewards, abs=ATOL)
        assert result.best == result.candidates[0] and result.generator == raw["generator"]

    with RewardClient(server.http_url) as http, GrpcRewardClient(server.grpc_target) as rpc:
        for client in (http, rpc):
            check(client.best_of_n(PROMPT, n=3, max_tokens=8, seed=21, timeout=60))
            ranked = client.rerank(["b", "a"], messages=[{"role": "user", "content": PROMPT}], timeout=30)
            assert sorted(c.index for c in ranked.candidates) == [0, 1] and ranked.generator is None

    async def run_async() -> None:
        async with AsyncRewardClient(server.http_url) as http, AsyncGrpcRewardClient(server.grpc_target) as rpc:
            for client in (http, rpc):
                check(await client.best_of_n(PROMPT, n=3, max_tokens=8, seed=21, timeout=60))
                assert len((await client.rerank(["x", "y", "z"], PROMPT)).candidates) == 3

    import asyncio

    asyncio.run(run_async())


def test_clients_map_generator_failures(server):
    from clients import InvalidInputError, RewardClient, UnavailableError

    with RewardClient(server.http_url, max_retries=0) as client, swap_generator(server, _FailingGenerator()):
        with pytest.raises(UnavailableError) as err:
            client.best_of_n(PROMPT, n=2, max_tokens=4)
        assert err.value.code == 502 and err.value.type == "generator_error"
        with pytest.raises(InvalidInputError, match="max_n=8"):
            client.best_of_n(PROMPT, n=9)
