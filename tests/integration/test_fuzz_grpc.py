"""Malformed gRPC messages (hypothesis): random bytes, and valid messages cut short or with bytes changed, sent
to every RewardService method (read from the proto's descriptor) through a raw channel.

Bytes that do not parse as the method's message -> INVALID_ARGUMENT ("malformed request message"); bytes that
do parse are a request like any other -> answered or refused as a request (INVALID_ARGUMENT, NOT_FOUND for a
random model name, ...). Never UNKNOWN or INTERNAL, never a hang, and the server keeps serving.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc

SERVICE = "/rewardserve.v1.RewardService/"
RAW = {"request_serializer": lambda b: b, "response_deserializer": lambda b: b}
SETTINGS = settings(max_examples=100, deadline=None, database=None, suppress_health_check=list(HealthCheck))

WORDS = st.text(max_size=12)
INPUT = st.one_of(
    st.builds(lambda p, r: pb.ScoreInput(pair=pb.PromptResponse(prompt=p, response=r)), WORDS, WORDS),
    st.builds(lambda ms: pb.ScoreInput(conversation=pb.Conversation(messages=[pb.Message(role=r, content=c)
                                                                              for r, c in ms])),
              st.lists(st.tuples(st.sampled_from(["user", "assistant", "system", "robot", ""]), WORDS), max_size=3)),
    st.builds(lambda raw: pb.ScoreInput(raw=raw), WORDS),
    st.just(pb.ScoreInput()),
)
REQUEST = st.builds(
    lambda model, inputs, rid, norm: pb.ScoreRequest(model=model, inputs=inputs, request_id=rid, normalize=norm),
    st.sampled_from(["", "tiny-bert", "other"]), st.lists(INPUT, max_size=4), WORDS, st.booleans(),
)


@st.composite
def mutated(draw) -> bytes:
    """A valid ScoreRequest's bytes, cut short and/or with bytes overwritten or inserted."""
    data = bytearray(draw(REQUEST).SerializeToString())
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["cut", "flip", "insert"]))
        pos = draw(st.integers(min_value=0, max_value=len(data)))
        if op == "cut":
            del data[pos:]
        elif op == "flip" and pos < len(data):
            data[pos] = draw(st.integers(min_value=0, max_value=255))
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
    return bytes(data)


PAYLOAD = st.one_of(st.binary(max_size=200), mutated())


def parses(message_type, data: bytes) -> bool:
    try:
        message_type.FromString(data)
    except DecodeError:
        return False
    return True


SERVICE_DESCRIPTOR = pb.DESCRIPTOR.services_by_name["RewardService"]
METHODS = {m.name: m for m in SERVICE_DESCRIPTOR.methods}  # every method, including ones added later
UNARY = sorted(name for name, m in METHODS.items() if not m.client_streaming and not m.server_streaming)
STREAMING = sorted(name for name, m in METHODS.items() if m.client_streaming and m.server_streaming)
# A request that parses is an ordinary request: answered, or refused as a request can be. UNIMPLEMENTED is
# Best-of-N on a server without a generator (this one).
REQUEST_CODES = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                 grpc.StatusCode.UNIMPLEMENTED}


def request_type(name: str):
    return getattr(pb, METHODS[name].input_type.name)


@pytest.fixture(scope="module")
def channel(bert_server):
    with grpc.insecure_channel(bert_server.grpc_target) as ch:
        yield ch


def code_of(call) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


def test_every_method_is_covered():
    assert {"Score", "ListModels"} <= set(UNARY) and "ScoreStream" in STREAMING
    assert set(UNARY) | set(STREAMING) == set(METHODS)  # no other call shape to fuzz


@pytest.mark.parametrize("method", UNARY)
def test_unary(channel, method):
    call = channel.unary_unary(SERVICE + method, **RAW)

    @SETTINGS
    @given(data=PAYLOAD)
    def fuzz(data):
        code, details = code_of(lambda: call(data, timeout=30))
        if parses(request_type(method), data):
            assert code in REQUEST_CODES, (code, details)
        else:
            assert code == grpc.StatusCode.INVALID_ARGUMENT, (code, details)
            assert "malformed request message" in details

    fuzz()


@pytest.mark.parametrize("method", STREAMING)
def test_streaming(channel, method):
    call = channel.stream_stream(SERVICE + method, **RAW)

    @SETTINGS
    @given(messages=st.lists(PAYLOAD, min_size=1, max_size=4))
    def fuzz(messages):
        answers: list[bytes] = []
        code, details = code_of(lambda: answers.extend(call(iter(messages), timeout=30)))
        if all(parses(request_type(method), m) for m in messages):
            assert code in REQUEST_CODES, (code, details)
        else:  # a message that does not parse ends the stream (an earlier invalid one may end it first)
            assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, details)
        if code == grpc.StatusCode.OK:
            assert len(answers) == len(messages)  # one answer per request (in-band errors included)

    fuzz()


def test_server_still_serves(bert_server, channel):
    reply = reward_pb2_grpc.RewardServiceStub(channel).Score(pb.ScoreRequest(inputs=[pb.ScoreInput(raw="ok")]),
                                                             timeout=10)
    assert len(reply.scores) == 1
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
