"""Every string field of every route, filled from Hypothesis' full Unicode alphabet, lone surrogates included:
the answer is a score or a typed 4xx JSON error, never a 5xx or a plain-text answer.

HTTP carries lone surrogates as JSON escapes (`"\\ud800"`); gRPC cannot (protobuf strings are UTF-8), so its
fuzz uses every other code point, plus hand-made messages whose bytes are not UTF-8.
"""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import reward_pb2, reward_pb2_grpc
from tests.helpers import LiveServer, test_config

ANY_TEXT = st.text(alphabet=st.characters(exclude_categories=()), max_size=24)  # surrogates included
UTF8_TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=24)  # every code point a protobuf string can carry
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# (route, body builder): `s` lands in one string field each
HTTP_FIELDS = [
    ("/v1/score", lambda s: {"inputs": [{"raw": s}]}),
    ("/v1/score", lambda s: {"inputs": [{"prompt": s, "response": "r"}]}),
    ("/v1/score", lambda s: {"inputs": [{"prompt": "p", "response": s}]}),
    ("/v1/score", lambda s: {"inputs": [{"messages": [{"role": "user", "content": s},
                                                      {"role": "assistant", "content": "a"}]}]}),
    ("/v1/score", lambda s: {"inputs": [{"messages": [{"role": s, "content": "c"}]}]}),
    ("/v1/score", lambda s: {"inputs": [{"messages": [{"role": "user", "content": "q"},
                                                      {"role": "tool", "content": "t", "name": s},
                                                      {"role": "assistant", "content": "a"}]}]}),
    ("/v1/score", lambda s: {"model": s, "inputs": [{"raw": "x"}]}),
    ("/get_reward", lambda s: {"query": [s]}),
    ("/get_reward", lambda s: {"query": ["q"], "prompts": [s]}),
    ("/classify", lambda s: {"input": s}),
    ("/classify", lambda s: {"input": [s, "b"], "use_activation": False}),
    ("/pooling", lambda s: {"messages": [{"role": "user", "content": s}]}),
    ("/pooling", lambda s: {"model": s, "input": "x"}),
    ("/tokenize", lambda s: {"prompt": s}),
    ("/tokenize", lambda s: {"messages": [{"role": "user", "content": s}]}),
    ("/v1/rerank", lambda s: {"prompt": s, "candidates": ["a"]}),
    ("/v1/rerank", lambda s: {"prompt": "p", "candidates": ["a", s]}),
    ("/v1/best-of-n", lambda s: {"prompt": s, "n": 1}),
]


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with LiveServer(test_config(tiny_llama_dir, model_name="tiny-llama")) as live:
        yield live


def check(response: httpx.Response, label: str) -> None:
    assert response.status_code < 500 or response.status_code == 501, (label, response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), label
    if response.status_code >= 400:
        error = response.json()["error"]
        assert error["code"] == response.status_code and error["type"] and error["message"], label


@pytest.mark.parametrize("index", range(len(HTTP_FIELDS)))
@SETTINGS
@given(text=ANY_TEXT)
def test_http_string_fields(server, index, text):
    route, build = HTTP_FIELDS[index]
    body = json.dumps(build(text), ensure_ascii=True).encode()  # lone surrogates travel as \\udXXX escapes
    response = httpx.post(server.http_url + route, content=body, headers={"content-type": "application/json"},
                          timeout=60)
    check(response, f"{route} {text!r}")


def test_a_lone_surrogate_is_a_400_naming_the_field(server):
    body = json.dumps({"inputs": [{"prompt": "ok", "response": "bad \ud800 text"}]}).encode()
    r = httpx.post(server.http_url + "/v1/score", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["error"]["type"] == "invalid_argument"
    assert "inputs.0.response" in r.json()["error"]["message"] and "surrogate" in r.json()["error"]["message"]


def grpc_inputs(s: str) -> list:
    msg = reward_pb2.Message
    return [
        reward_pb2.ScoreInput(raw=s),
        reward_pb2.ScoreInput(pair=reward_pb2.PromptResponse(prompt=s, response="r")),
        reward_pb2.ScoreInput(conversation=reward_pb2.Conversation(messages=[
            msg(role="user", content=s), msg(role="assistant", content="a")])),
        reward_pb2.ScoreInput(conversation=reward_pb2.Conversation(messages=[msg(role=s, content="c")])),
        reward_pb2.ScoreInput(conversation=reward_pb2.Conversation(messages=[
            msg(role="assistant", content="", tool_calls_json=s)])),
    ]


@SETTINGS
@given(text=UTF8_TEXT)
def test_grpc_string_fields(server, text):
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        requests = [reward_pb2.ScoreRequest(inputs=[inp]) for inp in grpc_inputs(text)]
        requests.append(reward_pb2.ScoreRequest(model=text, inputs=[reward_pb2.ScoreInput(raw="x")]))
        for request in requests:
            try:
                stub.Score(request, timeout=60)
            except grpc.RpcError as err:
                assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (text, err)
        try:
            stub.Rerank(reward_pb2.RerankRequest(prompt=text, candidates=[text, "b"]), timeout=60)
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (text, err)


def test_grpc_bytes_that_are_not_utf8_are_invalid_argument(server):
    request = reward_pb2.ScoreRequest()
    request.inputs.add().raw = "a\u0800"  # U+0800 is E0 A0 80; an encoded surrogate (ED A0 80) has the same length
    not_utf8 = request.SerializeToString().replace("a\u0800".encode(), b"a\xed\xa0\x80")
    with grpc.insecure_channel(server.grpc_target) as channel:
        call = channel.unary_unary("/rewardserve.v1.RewardService/Score", request_serializer=lambda b: b,
                                   response_deserializer=lambda b: b)
        for payload in (not_utf8, b"\xff\xfe not a message"):
            with pytest.raises(grpc.RpcError) as err:
                call(payload, timeout=30)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
