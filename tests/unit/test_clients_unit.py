"""clients/ without a server: input forms, chunking, retry decisions, error tables, and the HTTP clients over
httpx.MockTransport (order of chunks, headers, what is retried and what is not)."""

from __future__ import annotations

import json
import random

import httpx
import pytest
from grpc_health.v1 import health_pb2

from clients import (
    AsyncRewardClient, DeadlineExceededError, InvalidInputError, NotFoundError, OverloadedError,
    PayloadTooLargeError, RewardClient, ServerError, UnavailableError,
)
from clients.errors import AuthenticationError, grpc_error, http_error
from clients.grpc_client import (
    auth_metadata, credentials, decode_health_status, encode_health_request, to_proto,
)
from clients.http_client import tls_verify
from clients.retry import Attempts, Deadline, EndpointPool, RetryPolicy
from clients.types import chunk_request_ids, split, to_input_dicts

MESSAGES = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---- inputs -------------------------------------------------------------------------------------------
def test_input_forms():
    assert to_input_dicts([("p", "r"), "text", {"raw": "x"}, {"messages": MESSAGES}]) == [
        {"prompt": "p", "response": "r"}, {"raw": "text"}, {"raw": "x"}, {"messages": MESSAGES},
    ]


@pytest.mark.parametrize("bad,where", [([1], "inputs.0"), ([("a",)], "inputs.0"), (["ok", None], "inputs.1"),
                                       ([], "empty"), ("just a string", "wrap"), ({"raw": "x"}, "wrap"),
                                       (["\ud800"], "inputs.0.raw: a lone UTF-16 surrogate"),
                                       ([("p", "ok \udfff")], "inputs.0.response: a lone"),
                                       ([{"messages": [{"role": "user", "content": ["\ud800"]}]}],
                                        "inputs.0.messages.0.content.0: a lone")])
def test_bad_inputs_fail_locally(bad, where):
    with pytest.raises(InvalidInputError, match=where):
        to_input_dicts(bad)


def test_to_proto_forms_and_errors():
    assert to_proto(0, {"raw": "x"}).raw == "x"
    assert to_proto(0, {"prompt": "p", "response": "r"}).pair.response == "r"
    assert [m.role for m in to_proto(0, {"messages": MESSAGES}).conversation.messages] == ["user", "assistant"]
    for bad in ({"prompt": "p"}, {"raw": "x", "extra": 1}, {"raw": 5},
                {"messages": [{"role": "user", "content": "q", "weight": 1}]}, {"messages": ["nope"]},
                {"messages": [{"role": "assistant", "content": "", "tool_calls": [{"bad": {1, 2}}]}]}):
        with pytest.raises(InvalidInputError, match="inputs.3"):
            to_proto(3, bad)


def test_split_and_request_ids():
    assert split(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    assert sum(split(list(range(1000)), 64), []) == list(range(1000))
    assert chunk_request_ids("abc", 1) == ["abc"]
    assert chunk_request_ids("abc", 3) == ["abc-0", "abc-1", "abc-2"]
    assert len(chunk_request_ids(None, 1)[0]) == 32


# ---- retry decisions ----------------------------------------------------------------------------------
def test_full_jitter_backoff_bounds():
    policy = RetryPolicy(backoff_base=0.1, backoff_cap=1.0)
    rng = random.Random(0)
    for retry, bound in [(0, 0.1), (1, 0.2), (3, 0.8), (4, 1.0), (10, 1.0)]:
        delays = [policy.backoff(retry, rng) for _ in range(200)]
        assert all(0.0 <= d <= bound for d in delays)
        assert max(delays) > bound * 0.8  # spread over the whole range, not a fixed pause


def test_pool_round_robin_and_cooldown():
    clock = Clock()
    pool = EndpointPool(["a", "b", "c"], cooldown_s=5.0, clock=clock)
    assert [pool.pick() for _ in range(4)] == ["a", "b", "c", "a"]
    pool.mark_down("b")
    assert [pool.pick() for _ in range(4)] == ["c", "a", "c", "a"]
    clock.now += 5.0
    assert sorted(pool.pick() for _ in range(3)) == ["a", "b", "c"]
    for name in "abc":
        pool.mark_down(name)
        clock.now += 1.0
    assert not pool.any_up() and pool.pick() == "a"  # all down: the one back soonest


def attempts_for(endpoints, timeout=None, clock=None, **policy):
    clock = clock or Clock()
    pool = EndpointPool(endpoints, cooldown_s=5.0, clock=clock)
    return Attempts(pool, RetryPolicy(**policy), Deadline(timeout, clock=clock), random.Random(0))


def test_never_retried_errors_raise_at_once():
    for exc in (InvalidInputError("x"), NotFoundError("x"), DeadlineExceededError("x"), ServerError("x"),
                AuthenticationError("x")):
        attempts = attempts_for(["a", "b"])
        endpoint, _ = attempts.next()
        with pytest.raises(type(exc)):
            attempts.failed(endpoint, exc)
        assert exc.attempts == 1


def test_failover_is_free_once_per_other_endpoint_then_backs_off():
    attempts = attempts_for(["a", "b"], max_retries=1)
    assert attempts.next()[0] == "a"
    assert attempts.failed("a", UnavailableError("down")) == 0.0  # free: b is up
    assert attempts.next()[0] == "b"
    assert attempts.failed("b", UnavailableError("down")) > 0.0  # none up: a retry with backoff
    attempts.next()
    with pytest.raises(UnavailableError) as info:
        attempts.failed("a", UnavailableError("down"))
    assert info.value.attempts == 3


def test_overload_backs_off_until_max_retries():
    attempts = attempts_for(["a"], max_retries=2, backoff_base=0.01)
    for _ in range(2):
        attempts.next()
        assert 0.0 <= attempts.failed("a", OverloadedError("full")) <= 0.04
    attempts.next()
    with pytest.raises(OverloadedError):
        attempts.failed("a", OverloadedError("full"))


def test_no_retry_past_the_deadline():
    clock = Clock()
    attempts = attempts_for(["a"], timeout=1.0, clock=clock, max_retries=100, backoff_base=10.0, backoff_cap=10.0)
    attempts.rng = random.Random(1)  # uniform(0, 10) > 1 s left: the pause is cut to half the time left
    attempts.next()
    assert attempts.failed("a", OverloadedError("full")) == 0.5
    clock.now += 0.95  # 0.05 s left: not enough for another attempt, the last error is raised
    attempts.next()
    with pytest.raises(OverloadedError):
        attempts.failed("a", OverloadedError("full"))
    clock.now += 2.0
    with pytest.raises(DeadlineExceededError, match="timeout of 1.0s passed"):
        attempts.next()


# ---- error tables -------------------------------------------------------------------------------------
def body(kind: str, code: int) -> bytes:
    return json.dumps({"error": {"type": kind, "message": f"{kind} message", "code": code}}).encode()


@pytest.mark.parametrize("status,payload,cls", [
    (400, body("invalid_argument", 400), InvalidInputError),
    (422, body("invalid_argument", 422), InvalidInputError),
    (404, body("not_found", 404), NotFoundError),
    (413, body("payload_too_large", 413), PayloadTooLargeError),
    (401, body("unauthenticated", 401), AuthenticationError),
    (429, body("overloaded", 429), OverloadedError),
    (500, body("backend_error", 500), ServerError),
    (503, body("unavailable", 503), UnavailableError),
    (502, b"<html>bad gateway</html>", UnavailableError),
    (504, body("deadline_exceeded", 504), DeadlineExceededError),
    (504, b"upstream timed out", UnavailableError),  # a proxy's 504: another replica may answer
])
def test_http_error_table(status, payload, cls):
    exc = http_error(status, payload, "http://x")
    assert type(exc) is cls and exc.code == status and exc.endpoint == "http://x"
    if payload.startswith(b"{"):
        assert exc.type == json.loads(payload)["error"]["type"] and exc.message.endswith("message")


@pytest.mark.parametrize("code,details,cls", [
    ("INVALID_ARGUMENT", "inputs.0", InvalidInputError), ("NOT_FOUND", "model", NotFoundError),
    ("RESOURCE_EXHAUSTED", "queue is full", OverloadedError),
    ("RESOURCE_EXHAUSTED", "Received message larger than max (9 vs. 4)", PayloadTooLargeError),
    ("UNAVAILABLE", "draining", UnavailableError), ("DEADLINE_EXCEEDED", "", DeadlineExceededError),
    ("CANCELLED", "", UnavailableError),  # cut off by a server that shuts down: another endpoint may answer
    ("INTERNAL", "NaN", ServerError), ("UNAUTHENTICATED", "key", AuthenticationError),
])
def test_grpc_error_table(code, details, cls):
    exc = grpc_error(code, details, "h:1")
    kind = "payload_too_large" if cls is PayloadTooLargeError else code.lower()  # gRPC's own size refusal
    assert type(exc) is cls and exc.code == code and exc.type == kind
    assert grpc_error(code, "", "h:1", "some_kind").type == "some_kind"  # the server's metadata, where it sent one


def test_error_type_metadata_key_is_the_servers():
    from clients.grpc_client import ERROR_TYPE_KEY
    from service.error_map import ERROR_TYPE_METADATA

    assert ERROR_TYPE_KEY == ERROR_TYPE_METADATA


def test_health_messages_match_grpc_health():
    for service in ("", "rewardserve.v1.RewardService"):
        assert encode_health_request(service) == health_pb2.HealthCheckRequest(service=service).SerializeToString()
    for status in (0, 1, 2, 3):
        wire = health_pb2.HealthCheckResponse(status=status).SerializeToString()
        assert decode_health_status(wire) == status


def test_auth_and_tls_options_are_wired():
    import certifi

    assert auth_metadata("k") == (("authorization", "Bearer k"),) and auth_metadata(None) is None
    assert credentials(False, None, None, None) is None
    assert credentials(True, None, None, None) is not None
    assert credentials(False, certifi.where(), None, None) is not None
    assert tls_verify(None, None, None, True) is True and tls_verify(None, None, None, False) is False
    assert tls_verify(certifi.where(), None, None, True).verify_mode.name == "CERT_REQUIRED"


# ---- HTTP clients over a mock transport ----------------------------------------------------------------
class Recorder:
    """A fake server: answers the scripted statuses first, then echoes each input's number as its reward."""

    def __init__(self, script=()):
        self.script = list(script)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.script:
            status = self.script.pop(0)
            return httpx.Response(status, content=body(f"status_{status}", status))
        inputs = json.loads(request.content)["inputs"]
        scores = [{"reward": float(i["raw"]), "truncated": False, "tokens": 1} for i in inputs]
        return httpx.Response(200, json={"model": "m", "scores": scores})


def mock_client(recorder: Recorder, cls=RewardClient, **options):
    transport = httpx.MockTransport(recorder)
    options = {"backoff_base": 0.001, "backoff_cap": 0.002, **options}
    return cls(["http://a:1", "http://b:2"], httpx_options={"transport": transport}, **options)


def test_sync_chunks_in_order_with_headers():
    recorder = Recorder()
    with mock_client(recorder, max_batch_size=64, api_key="secret", timeout=30) as client:
        rewards = client.score([str(i) for i in range(1000)], request_id="job")
    assert rewards == [float(i) for i in range(1000)]
    assert len(recorder.requests) == 16
    assert {r.url.host for r in recorder.requests} == {"a", "b"}  # round-robin
    first = recorder.requests[0].headers
    assert first["authorization"] == "Bearer secret" and first["x-request-id"] == "job-0"
    assert 0 < float(first["x-request-timeout"]) <= 30


async def test_async_chunks_concurrently_in_order():
    recorder = Recorder()
    async with mock_client(recorder, AsyncRewardClient, max_batch_size=7, max_concurrency=4) as client:
        rewards = await client.score([str(i) for i in range(100)])
    assert rewards == [float(i) for i in range(100)]
    assert len(recorder.requests) == 15


@pytest.mark.parametrize("script,requests", [([503, 503], 3), ([429, 429], 3), ([502, 504], 3)])
def test_transient_statuses_are_retried(script, requests):
    recorder = Recorder(script)
    with mock_client(recorder) as client:
        assert client.score(["1"]) == [1.0]
    assert len(recorder.requests) == requests


@pytest.mark.parametrize("status,cls", [(400, InvalidInputError), (404, NotFoundError), (413, PayloadTooLargeError),
                                        (422, InvalidInputError), (500, ServerError)])
def test_client_errors_are_not_retried(status, cls):
    recorder = Recorder([status])
    with mock_client(recorder) as client, pytest.raises(cls) as info:
        client.score(["1"])
    assert len(recorder.requests) == 1 and info.value.attempts == 1 and info.value.code == status


def test_retries_stop_at_max_retries():
    recorder = Recorder([429] * 10)
    with mock_client(recorder, max_retries=2) as client, pytest.raises(OverloadedError) as info:
        client.score(["1"])
    assert len(recorder.requests) == 3 == info.value.attempts


def test_bad_answer_is_a_server_error():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, json={"model": "m", "scores": []})

    client = RewardClient("http://a:1", httpx_options={"transport": httpx.MockTransport(handler)})
    with client, pytest.raises(ServerError, match="0 scores for 1 inputs"):
        client.score(["x"])


def test_a_non_finite_reward_from_a_server_is_an_error_not_a_number():
    """rewardserve never answers NaN; another server or a proxy might (JSON's NaN is what Python writes)."""
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=b'{"scores": [{"reward": 1.0, "truncated": false, "tokens": 1}, '
                                           b'{"reward": NaN, "truncated": false, "tokens": 1}]}')

    client = RewardClient("http://a:1", httpx_options={"transport": httpx.MockTransport(handler)})
    with client, pytest.raises(ServerError, match=r"inputs.1: the server answered a non-finite reward \(nan\)"):
        client.score(["x", "y"])


def test_endpoints_must_be_urls():
    with pytest.raises(ValueError, match="base URL"):
        RewardClient("127.0.0.1:8000")


def test_gather_or_cancel_reads_every_failure(caplog):
    """The first failure (in input order) is raised and the others are read too: no "Task exception was never
    retrieved" tracebacks from a split call whose requests fail together."""
    import asyncio
    import gc
    import logging

    from clients.base import gather_or_cancel

    async def fail(i):
        await asyncio.sleep(0)  # all fail in the same turn of the loop
        raise ValueError(f"request {i}")

    async def run():
        with pytest.raises(ValueError, match="request 0"):
            await gather_or_cancel([fail(i) for i in range(3)])

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        asyncio.run(run())
        gc.collect()
    assert "never retrieved" not in caplog.text


# ---- retries until the deadline, defaults that leave room, closed clients -------------------------------
def test_overload_and_outage_are_retried_until_the_deadline():
    """A long call waits for a busy or restarting server as long as its timeout allows (it gave up after 3
    retries, ~0.6 s, whatever the timeout); the pauses grow to the cap and shrink to fit before the deadline."""
    from clients.retry import MIN_RETRY_S

    for error in (OverloadedError("full"), UnavailableError("refused")):
        clock = Clock()
        attempts = attempts_for(["a"], timeout=30.0, clock=clock)  # default policy: max_retries None
        pauses = []
        with pytest.raises(type(error)) as info:
            while True:
                attempts.next()
                pauses.append(attempts.failed("a", error))
                clock.now += pauses[-1]
        assert len(pauses) > 10 and max(pauses) <= 5.0  # capped exponential backoff
        assert 30.0 - 2 * MIN_RETRY_S <= clock.now - 100.0 <= 30.0  # until the deadline, never past it
        assert info.value.attempts == len(pauses) + 1  # the last failure is raised, not paused after


def test_without_a_deadline_retries_are_capped():
    from clients.retry import MAX_RETRIES_WITHOUT_DEADLINE

    attempts = attempts_for(["a"], timeout=None)
    with pytest.raises(OverloadedError) as info:
        while True:
            attempts.next()
            attempts.failed("a", OverloadedError("full"))
    assert info.value.attempts == MAX_RETRIES_WITHOUT_DEADLINE + 1


def test_one_client_alone_does_not_fill_the_servers_default_queue():
    from clients.base import ClientBase
    from service.config import ServeConfig  # noqa: F401 (tests may import the service; clients/ may not)

    client = AsyncRewardClient("http://a:1")
    queue = ServeConfig.model_fields["max_queue"].default
    assert client.max_concurrency * client.max_batch_size <= queue // 2
    assert ClientBase.__init__.__kwdefaults__["max_retries"] is None  # bounded by the deadline instead


def test_a_bare_400_is_not_an_invalid_input():
    """uvicorn's plain-text 400 (a corrupted HTTP request, e.g. two processes writing to one socket) or a proxy's
    400 page says nothing about the inputs; our server's 400 does."""
    from clients.errors import RewardClientError

    bare = http_error(400, b"Invalid HTTP request received.", "http://e")
    assert not isinstance(bare, InvalidInputError) and isinstance(bare, RewardClientError)
    assert bare.type == "bad_http_request" and "Invalid HTTP request received." in bare.message
    ours = http_error(400, body("invalid_argument", 400), "http://e")
    assert isinstance(ours, InvalidInputError) and ours.type == "invalid_argument"


def test_a_closed_client_says_so():
    import asyncio

    from clients import ClientClosedError, GrpcRewardClient

    client = mock_client(Recorder())
    assert client.score(["1"]) == [1.0]
    client.close()
    for call in (lambda: client.score(["1"]), client.models, client.health):
        with pytest.raises(ClientClosedError, match="closed"):
            call()
    with GrpcRewardClient("127.0.0.1:1") as rpc:
        pass
    with pytest.raises(ClientClosedError):
        rpc.score(["x"])

    async def closed_async():
        async with mock_client(Recorder(), AsyncRewardClient) as aclient:
            assert await aclient.score(["2"]) == [2.0]
        await aclient.score(["2"])

    with pytest.raises(ClientClosedError):
        asyncio.run(closed_async())


def test_per_loop_resources_are_closed_with_their_loop_and_not_shared_with_a_child(monkeypatch):
    """What the asyncio clients hold per event loop: opened on first use in each loop, closed when asyncio.run
    ends that loop, and never reused by a forked child (a new process id)."""
    import asyncio

    import clients.loops as loops

    opened, closed = [], []

    def open_one():
        opened.append(object())
        return opened[-1]

    async def close_one(resource):
        closed.append(resource)

    per_loop = loops.PerLoop(open_one, close_one)

    async def twice():
        return await per_loop.get(), await per_loop.get()

    first = asyncio.run(twice())
    assert first[0] is first[1] and closed == [first[0]]  # one per loop, closed at the loop's end
    second = asyncio.run(twice())
    assert second[0] is not first[0] and closed == [first[0], second[0]]

    async def fork_in_the_middle():
        parent = await per_loop.get()
        monkeypatch.setattr(loops.os, "getpid", lambda: -1)  # as in a forked child
        child = await per_loop.get()
        return parent, child

    parent, child = asyncio.run(fork_in_the_middle())
    assert child is not parent and parent not in closed and child in closed  # the parent's: left alone


def test_grpc_targets_take_the_schemes_people_write():
    from clients import GrpcRewardClient
    from clients.grpc_client import grpc_targets

    assert grpc_targets("grpc://127.0.0.1:50051", False) == (["127.0.0.1:50051"], False)
    assert grpc_targets(["grpcs://rm:443/", "rm2:50051"], False) == (["rm:443", "rm2:50051"], True)
    assert grpc_targets("dns:///rm:50051", False) == (["dns:///rm:50051"], False)
    with pytest.raises(ValueError, match="for an HTTP URL use RewardClient"):
        GrpcRewardClient("http://127.0.0.1:50051")
    client = GrpcRewardClient("grpc://127.0.0.1:1")
    assert client.endpoints == ["127.0.0.1:1"]
    client.close()
