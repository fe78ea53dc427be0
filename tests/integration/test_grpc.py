"""gRPC transport against a real Runtime (uvicorn + grpc.aio) on loopback; clients are plain grpc channels."""

from __future__ import annotations

import shutil
import time
from contextlib import contextmanager
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import REGISTRY

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from rewardmodel.normalization import RewardStats, save_stats
from tests.helpers import LiveServer, gated_worker, test_config

CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]
RAW = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
FORMS = {
    "pair": ({"prompt": "Tell me a joke.", "response": "Why did the chicken cross the road?"},
             pb.ScoreInput(pair=pb.PromptResponse(prompt="Tell me a joke.",
                                                  response="Why did the chicken cross the road?"))),
    "conversation": ({"messages": CHAT},
                     pb.ScoreInput(conversation=pb.Conversation(messages=[pb.Message(**m) for m in CHAT]))),
    "raw": ({"raw": RAW}, pb.ScoreInput(raw=RAW)),
}


@contextmanager
def stub_for(server: LiveServer):
    with grpc.insecure_channel(server.grpc_target) as channel:
        yield reward_pb2_grpc.RewardServiceStub(channel)


def pair(prompt: str, response: str) -> pb.ScoreInput:
    return pb.ScoreInput(pair=pb.PromptResponse(prompt=prompt, response=response))


def sample(name: str, labels: dict) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_until(predicate, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.005)


# ---- Score == HTTP ------------------------------------------------------------------------------------
@pytest.mark.parametrize("form", sorted(FORMS))
@pytest.mark.parametrize("server_name", ["bert_server", "llama_server"])
def test_score_equals_http(request, server_name, form):
    server = request.getfixturevalue(server_name)
    as_json, as_proto = FORMS[form]
    inputs_json = [as_json, {"prompt": "Short.", "response": "Yes."}]
    inputs_proto = [as_proto, pair("Short.", "Yes.")]
    http = httpx.post(f"{server.http_url}/v1/score", json={"inputs": inputs_json}, timeout=30).json()
    with stub_for(server) as stub:
        reply = stub.Score(pb.ScoreRequest(inputs=inputs_proto, request_id="r-1"), timeout=30)
    assert reply.model == http["model"] == server.engine.name
    assert reply.request_id == "r-1" and reply.sequence == 0
    assert [s.reward for s in reply.scores] == [s["reward"] for s in http["scores"]]  # bit-identical doubles
    assert [s.tokens for s in reply.scores] == [s["tokens"] for s in http["scores"]]
    assert [s.truncated for s in reply.scores] == [s["truncated"] for s in http["scores"]]
    assert not any(s.HasField("normalized") for s in reply.scores)


def test_score_reports_timing_and_metrics(bert_server):
    labels = {"transport": "grpc", "route": "Score", "code": "OK"}
    before = sample("rewardserve_requests_total", labels)
    with stub_for(bert_server) as stub:
        _, call = stub.Score.with_call(pb.ScoreRequest(inputs=[pair("a", "b")]), timeout=30)
    trailers = dict(call.trailing_metadata())
    assert float(trailers["x-queue-time-ms"]) >= 0 and float(trailers["x-compute-time-ms"]) > 0
    assert sample("rewardserve_requests_total", labels) == before + 1


def test_list_models(bert_server):
    with stub_for(bert_server) as stub:
        reply = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    assert [m.id for m in reply.models] == ["tiny-bert"]
    assert reply.models[0].max_model_len == bert_server.engine.max_length
    assert not reply.models[0].HasField("normalization")


# ---- ScoreStream --------------------------------------------------------------------------------------
def stream_requests(n: int) -> list[pb.ScoreRequest]:
    return [
        pb.ScoreRequest(
            request_id=f"req-{i}",
            inputs=[pair(f"Question {i}?", "Answer " + "word " * (i * 7)) for _ in range(1 + i % 4)],
        )
        for i in range(n)
    ]


@pytest.mark.parametrize("server_name", ["bert_server", "llama_server"])
def test_stream_answers_every_request_once(request, server_name):
    server = request.getfixturevalue(server_name)
    requests = stream_requests(20)
    with stub_for(server) as stub:
        replies = list(stub.ScoreStream(iter(requests), timeout=60))
        unary = [stub.Score(r, timeout=30) for r in requests]
    assert sorted(r.request_id for r in replies) == sorted(r.request_id for r in requests)
    for reply in replies:
        i = int(reply.request_id.split("-")[1])
        assert reply.sequence == i and not reply.HasField("error")
        # batch composition differs between stream and unary: equal within the fp32 contract
        assert [s.reward for s in reply.scores] == pytest.approx([s.reward for s in unary[i].scores], abs=1e-5)
        assert [s.tokens for s in reply.scores] == [s.tokens for s in unary[i].scores]


def test_stream_invalid_request_aborts_naming_it(bert_server):
    requests = stream_requests(3)
    requests.insert(2, pb.ScoreRequest(request_id="bad-one", inputs=[pb.ScoreInput()]))
    with stub_for(bert_server) as stub, pytest.raises(grpc.RpcError) as err:
        list(stub.ScoreStream(iter(requests), timeout=60))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id=bad-one sequence=2" in err.value.details()
    assert "inputs.0: no input set" in err.value.details()


def stream_until_error(server, requests: list[pb.ScoreRequest]) -> tuple[list, Any]:
    """The replies a ScoreStream gives before it ends with an error, and that error (pytest's ExceptionInfo)."""
    replies = []
    with stub_for(server) as stub, pytest.raises(grpc.RpcError) as err:
        for reply in stub.ScoreStream(iter(requests), timeout=60):
            replies.append(reply)
    return replies, err


def test_requests_before_an_invalid_one_are_answered_before_the_stream_ends(bert_server):
    """Accepted work is not thrown away by a later client bug, whatever the timing: the requests read before the
    invalid one are all answered (sent at once, they are still being scored when it fails validation)."""
    requests = stream_requests(10)
    requests.insert(10, pb.ScoreRequest(request_id="bad-one", inputs=[]))
    requests += stream_requests(3)
    replies, err = stream_until_error(bert_server, requests)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "sequence=10" in err.value.details()
    assert sorted(r.sequence for r in replies) == list(range(10))
    assert all(len(r.scores) >= 1 and not r.HasField("error") for r in replies)


def slow_invalid(request_id: str, long_inputs: int) -> pb.ScoreRequest:
    """Invalid only once its long first inputs are tokenized on the tokenizer thread (one: a few ms, the reader
    has read the whole stream and waits for the requests in flight; 40: long after the rest has been read)."""
    steps = pb.ScoreInput(steps=pb.Steps(prompt="q", steps=["a", "b"]))  # tiny-bert has no step head
    return pb.ScoreRequest(request_id=request_id, inputs=[*[pb.ScoreInput(raw="word " * 3000)] * long_inputs, steps])


def test_requests_before_a_late_failing_invalid_one_are_answered(bert_server):
    """The reader waiting for the requests in flight when the invalid one fails: cancelling it must not cancel
    them (it did: 0-10 of the 10 earlier requests came back)."""
    for _ in range(3):
        requests = [*stream_requests(10), slow_invalid("bad-one", 1), *stream_requests(3)]
        replies, err = stream_until_error(bert_server, requests)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id=bad-one sequence=10: inputs.1: model 'tiny-bert' has no step head" in err.value.details()
        assert set(range(10)) <= {r.sequence for r in replies}
        assert all(len(r.scores) >= 1 and not r.HasField("error") for r in replies)


def test_stream_with_two_invalid_requests_names_the_first(bert_server):
    """The later invalid request fails first (at once), the earlier one only after tokenizing: the stream ends
    naming the earlier one, and the requests before it are answered."""
    requests = [*stream_requests(3), slow_invalid("bad-early", 40), *stream_requests(5),
                pb.ScoreRequest(request_id="bad-late", inputs=[])]
    replies, err = stream_until_error(bert_server, requests)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request_id=bad-early sequence=3" in err.value.details()
    assert {0, 1, 2} <= {r.sequence for r in replies} and 3 not in {r.sequence for r in replies}


def test_empty_stream_ends_ok(bert_server):
    with stub_for(bert_server) as stub:
        assert list(stub.ScoreStream(iter([]), timeout=10)) == []


# ---- errors -------------------------------------------------------------------------------------------
BAD_REQUESTS = {
    "no_oneof": (pb.ScoreRequest(inputs=[pair("a", "b"), pb.ScoreInput()]),
                 grpc.StatusCode.INVALID_ARGUMENT, "inputs.1: no input set"),
    "bad_role": (pb.ScoreRequest(inputs=[pb.ScoreInput(conversation=pb.Conversation(messages=[
        pb.Message(role="robot", content="hi"), pb.Message(role="assistant", content="yo")]))]),
                 grpc.StatusCode.INVALID_ARGUMENT, "inputs.0.messages.0.role"),
    "last_not_assistant": (pb.ScoreRequest(inputs=[pb.ScoreInput(conversation=pb.Conversation(messages=[
        pb.Message(role="user", content="hi")]))]),
                           grpc.StatusCode.INVALID_ARGUMENT, "last message must have role 'assistant'"),
    "empty_conversation": (pb.ScoreRequest(inputs=[pb.ScoreInput(conversation=pb.Conversation())]),
                           grpc.StatusCode.INVALID_ARGUMENT, "inputs.0.messages"),
    "empty_inputs": (pb.ScoreRequest(), grpc.StatusCode.INVALID_ARGUMENT, "inputs is empty"),
    "unknown_model": (pb.ScoreRequest(model="gpt-9", inputs=[pair("a", "b")]),
                      grpc.StatusCode.NOT_FOUND, "unknown model 'gpt-9'"),
    "normalize_without_stats": (pb.ScoreRequest(normalize=True, inputs=[pair("a", "b")]),
                                grpc.StatusCode.INVALID_ARGUMENT, "cannot normalize"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_invalid_requests(bert_server, case):
    request, code, fragment = BAD_REQUESTS[case]
    with stub_for(bert_server) as stub, pytest.raises(grpc.RpcError) as err:
        stub.Score(request, timeout=10)
    assert err.value.code() == code
    assert fragment in err.value.details()


MALFORMED = {
    "bad utf-8": pb.ScoreRequest(inputs=[pb.ScoreInput(raw="ab")]).SerializeToString().replace(b"ab", b"\xff\xfe"),
    "corrupt wire": b"\x0a\xff\xff\xff",
    "garbage": b"garbage\x00\x01",
}


def test_unknown_fields_are_not_malformed(bert_server):
    """ListModelsRequest has no fields: a ScoreRequest's bytes (even with bad UTF-8 inside) are unknown
    fields there, which proto3 skips without decoding them, so the call is valid."""
    with grpc.insecure_channel(bert_server.grpc_target) as channel:
        path = "/rewardserve.v1.RewardService/ListModels"
        reply = channel.unary_unary(path, request_serializer=lambda b: b,
                                    response_deserializer=pb.ListModelsResponse.FromString)(
            MALFORMED["bad utf-8"], timeout=10)
        assert reply.models[0].id == "tiny-bert"


@pytest.mark.parametrize("case,method", [
    (case, method) for case in sorted(MALFORMED) for method in ("Score", "ScoreStream", "ListModels")
    if not (method == "ListModels" and case == "bad utf-8")  # valid there: see the test above
])
def test_malformed_bytes_are_invalid_argument(bert_server, case, method):
    with grpc.insecure_channel(bert_server.grpc_target) as channel:
        path = f"/rewardserve.v1.RewardService/{method}"
        identity = dict(request_serializer=lambda b: b, response_deserializer=lambda b: b)
        with pytest.raises(grpc.RpcError) as err:
            if method == "ScoreStream":
                list(channel.stream_stream(path, **identity)(iter([MALFORMED[case]]), timeout=10))
            else:
                channel.unary_unary(path, **identity)(MALFORMED[case], timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
        assert "malformed request message" in err.value.details()
        # the server is fine afterwards
        assert reward_pb2_grpc.RewardServiceStub(channel).Score(
            pb.ScoreRequest(inputs=[pb.ScoreInput(raw="ok")]), timeout=10
        ).scores


def test_tiny_deadline_on_big_request(bert_server):
    big = pb.ScoreRequest(inputs=[pair(f"prompt {i} " * 50, "response " * 100) for i in range(512)])
    with stub_for(bert_server) as stub:
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(big, timeout=0.001)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(stub.Score(pb.ScoreRequest(inputs=[pair("a", "b")]), timeout=30).scores) == 1


CANCEL_CASES = {  # route -> (start a call holding 3 inputs, requests counted on that route)
    "Score": (lambda stub: stub.Score.future(pb.ScoreRequest(inputs=[pair("c", "d")] * 3), timeout=30), 1),
    "ScoreStream": (lambda stub: stub.ScoreStream(iter([
        pb.ScoreRequest(request_id="s-0", inputs=[pair("c", "d")] * 2),
        pb.ScoreRequest(request_id="s-1", inputs=[pair("e", "f")]),
    ]), timeout=30), 2),
}


@pytest.mark.parametrize("route", sorted(CANCEL_CASES))
def test_client_cancel_drops_queued_inputs(bert_server, route):
    start_call, requests = CANCEL_CASES[route]
    batcher = bert_server.engine.batcher
    dropped = ("rewardserve_dropped_inputs_total", {"model": "tiny-bert", "reason": "cancelled"})
    cancelled = ("rewardserve_requests_total", {"transport": "grpc", "route": route, "code": "CANCELLED"})
    in_flight = ("rewardserve_in_flight_requests", {"transport": "grpc"})
    before_dropped, before_cancelled, base = sample(*dropped), sample(*cancelled), sample(*in_flight)
    with stub_for(bert_server) as stub, gated_worker(bert_server) as (entered, gate):
        first = stub.Score.future(pb.ScoreRequest(inputs=[pair("a", "b")]), timeout=30)
        assert entered.wait(10)  # the worker holds `first`; what comes next waits in the queue
        call = start_call(stub)
        wait_until(lambda: batcher.depth == 4)
        call.cancel()
        wait_until(lambda: sample(*in_flight) == base + 1)  # the server has given up the cancelled call
        wait_until(lambda: batcher.depth == 1)  # its inputs left the queue while the pass is still held
        gate.set()
        assert len(first.result(timeout=30).scores) == 1
        wait_until(lambda: batcher.depth == 0)
    assert sample(*dropped) == before_dropped + 3  # withdrawn: no forward pass spent
    assert sample(*cancelled) == before_cancelled + requests


def test_deadline_while_queued(bert_server):
    """The call's deadline passes while its inputs wait: DEADLINE_EXCEEDED, counted as such, inputs skipped."""
    batcher = bert_server.engine.batcher
    expired = ("rewardserve_requests_total", {"transport": "grpc", "route": "Score", "code": "DEADLINE_EXCEEDED"})
    dropped = ("rewardserve_dropped_inputs_total", {"model": "tiny-bert", "reason": "deadline"})
    before, before_dropped = sample(*expired), sample(*dropped)
    with stub_for(bert_server) as stub, gated_worker(bert_server) as (entered, gate):
        first = stub.Score.future(pb.ScoreRequest(inputs=[pair("a", "b")]), timeout=30)
        assert entered.wait(10)
        with pytest.raises(grpc.RpcError) as err:
            stub.Score(pb.ScoreRequest(inputs=[pair("c", "d")] * 2), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_until(lambda: sample(*expired) == before + 1)
        wait_until(lambda: batcher.depth == 1)  # its room is free at once, not after the held pass
        gate.set()
        first.result(timeout=30)
        wait_until(lambda: batcher.depth == 0)
    assert sample(*dropped) == before_dropped + 2  # missed their deadline (not "cancelled": nobody hung up early)


# ---- health and reflection ----------------------------------------------------------------------------
@pytest.mark.parametrize("service", ["", "rewardserve.v1.RewardService"])
def test_health_serving(bert_server, service):
    with grpc.insecure_channel(bert_server.grpc_target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_service(bert_server):
    with grpc.insecure_channel(bert_server.grpc_target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=10))
    names = {s.name for s in replies[0].list_services_response.service}
    assert "rewardserve.v1.RewardService" in names and "grpc.health.v1.Health" in names


# ---- a server with small limits and reward stats ------------------------------------------------------
@pytest.fixture(scope="module")
def small_server(tiny_bert_dir, tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("bert-with-stats") / "rm"
    shutil.copytree(tiny_bert_dir, model_dir)
    save_stats(model_dir, RewardStats(mean=0.25, std=2.0))
    config = test_config(model_dir, model_name="small", max_body_bytes=4096, max_queue=4, warmup=False)
    with LiveServer(config) as server:
        yield server


def test_oversized_message_is_resource_exhausted(small_server):
    with stub_for(small_server) as stub, pytest.raises(grpc.RpcError) as err:
        stub.Score(pb.ScoreRequest(inputs=[pb.ScoreInput(raw="x" * 10_000)]), timeout=10)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_client_errors_carry_the_servers_kind(small_server):
    """The client's error `type` is the server's `rewardserve-error-type` (as HTTP's body `type`), and a message
    gRPC itself refuses for its size (no handler, no metadata) is `payload_too_large`, not a full queue."""
    from clients import GrpcRewardClient
    from clients.errors import NotFoundError, PayloadTooLargeError

    with GrpcRewardClient(small_server.grpc_target, max_retries=0) as client:
        with pytest.raises(PayloadTooLargeError) as too_big:
            client.score([{"raw": "x" * 10_000}])
        with pytest.raises(NotFoundError) as unknown:
            client.score([{"raw": "x"}], model="nope")
    assert too_big.value.type == "payload_too_large"
    assert unknown.value.type == "not_found"


def test_normalize_and_model_stats(small_server):
    with stub_for(small_server) as stub:
        reply = stub.Score(pb.ScoreRequest(normalize=True, inputs=[pair("a", "b")]), timeout=10)
        models = stub.ListModels(pb.ListModelsRequest(), timeout=10)
    score = reply.scores[0]
    assert score.normalized == (score.reward - 0.25) / 2.0
    assert models.models[0].normalization == pb.RewardStats(mean=0.25, std=2.0)


def test_stream_transient_error_is_in_band(small_server):
    """A request refused because the queue is full fails in-band; the one in flight beside it is answered."""
    batcher = small_server.engine.batcher

    def requests():
        yield pb.ScoreRequest(request_id="ok-0", inputs=[pair("a", "b")])  # fills the queue: 3 + 1 = 4
        wait_until(lambda: batcher.depth == 4)
        yield pb.ScoreRequest(request_id="refused", inputs=[pair("c", "d")])  # 5 > max_queue=4

    with stub_for(small_server) as stub, gated_worker(small_server) as (entered, gate):
        holder = stub.Score.future(pb.ScoreRequest(inputs=[pair("x", "y")] * 3), timeout=30)
        assert entered.wait(10)
        stream = stub.ScoreStream(requests(), timeout=30)
        refused = next(stream)  # the only answer possible while the worker is held
        gate.set()
        rest = list(stream)
        assert len(holder.result(timeout=30).scores) == 3
    assert refused.request_id == "refused" and refused.sequence == 1 and not refused.scores
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "queue full" in refused.error.message
    assert [(r.request_id, r.sequence, len(r.scores)) for r in rest] == [("ok-0", 0, 1)]
    assert not rest[0].HasField("error")


def test_health_not_serving_when_draining(small_server):
    """Last test of the module: flips the (module-scoped) server's health for good."""
    small_server.call(small_server.runtime._health.set_all_not_serving())
    with grpc.insecure_channel(small_server.grpc_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "rewardserve.v1.RewardService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
