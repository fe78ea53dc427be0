"""A server started without `--generator` (encoder RM, API keys on): Best-of-N is a clear typed error
(HTTP 501 `not_implemented`, gRPC UNIMPLEMENTED), rerank works, and both routes need a key like /v1/score.
Generator specs are checked, and the registry imports nothing heavy until a generator is chosen."""

from __future__ import annotations

from pathlib import Path

import grpc
import httpx
import pytest

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from service.generation.registry import parse_spec
from tests.helpers import LiveServer, run_with_imports_blocked, test_config

KEY = "k-bon-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def server(tiny_bert_dir):
    with LiveServer(test_config(tiny_bert_dir, model_name="tiny-bert", api_keys=[KEY])) as live:
        yield live


def test_best_of_n_without_a_generator_is_a_typed_error(server):
    r = httpx.post(server.http_url + "/v1/best-of-n", json={"prompt": "hi", "n": 2}, headers=AUTH, timeout=30)
    assert r.status_code == 501, r.text
    error = r.json()["error"]
    assert error["type"] == "not_implemented" and "--generator" in error["message"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            metadata = (("authorization", AUTH["Authorization"]),)
            stub.BestOfN(pb.BestOfNRequest(prompt="hi", n=2), timeout=30, metadata=metadata)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED and "--generator" in err.value.details()
    assert ("rewardserve-error-type", "not_implemented") in tuple(err.value.trailing_metadata())


def test_rerank_works_without_a_generator(server):
    candidates = ["hello there", "hi", "good morning to you"]
    r = httpx.post(server.http_url + "/v1/rerank", json={"prompt": "hi", "candidates": candidates}, headers=AUTH)
    assert r.status_code == 200, r.text
    ranked = r.json()["candidates"]
    score = httpx.post(server.http_url + "/v1/score", headers=AUTH,
                       json={"inputs": [{"prompt": "hi", "response": c} for c in candidates]}).json()["scores"]
    expected = {i: s["reward"] for i, s in enumerate(score)}
    assert {c["index"]: c["reward"] for c in ranked} == pytest.approx(expected, abs=1e-5)
    assert [c["rank"] for c in ranked] == [1, 2, 3]


@pytest.mark.parametrize("route", ["/v1/best-of-n", "/v1/rerank"])
def test_routes_need_a_key(server, route):
    body = {"prompt": "hi", "candidates": ["a"]} if route == "/v1/rerank" else {"prompt": "hi"}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.post(server.http_url + route, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "unauthenticated", r.text
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        for call, request in ((stub.BestOfN, pb.BestOfNRequest(prompt="hi")),
                              (stub.Rerank, pb.RerankRequest(prompt="hi", candidates=["a"]))):
            with pytest.raises(grpc.RpcError) as err:
                call(request, timeout=30)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("spec", ["smollm2", "vllm:", "llama:smollm2", "openai"])
def test_bad_generator_specs(spec):
    with pytest.raises(ValueError, match="expected vllm:PATH, openai:URL or hf:PATH"):
        parse_spec(spec)
    assert parse_spec("openai:http://127.0.0.1:9/v1") == ("openai", "http://127.0.0.1:9/v1")


def test_choosing_no_generator_imports_nothing_heavy():
    body = (
        "import sys\n"
        "from service.generation.registry import parse_spec, GENERATORS\n"
        "import service.bon, service.http_api.bon_routes, service.grpc_api.bon_codecs\n"
        "assert parse_spec('vllm:smollm2') == ('vllm', 'smollm2')\n"
        "leaked = [m for m in BLOCKED if m in sys.modules]\n"
        "assert not leaked, leaked\n"
    )
    out = run_with_imports_blocked({"vllm", "transformers"}, body, cwd=ROOT)
    assert out.returncode == 0, out.stderr
