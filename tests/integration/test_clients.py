"""clients/ against live servers: the four clients agree with each other and with a plain httpx POST; chunks come
back in order; bad input fails at once; transient failures (injected by small fault servers in front of the
real one, or a closed port) are retried; deadlines hold; a client with two servers survives one stopping;
and the package imports with torch, transformers and the service absent."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import socket
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
import httpx
import pytest
import uvicorn

from clients import (
    AsyncGrpcRewardClient, AsyncRewardClient, ClientClosedError, DeadlineExceededError, GrpcRewardClient, InvalidInputError,
    NotFoundError, OverloadedError, RewardClient, UnavailableError,
)
from protos import reward_pb2_grpc
from tests.helpers import (
    LiveServer, free_port, hold_forward, metric_value, run_with_imports_blocked, test_config,
)

ROOT = Path(__file__).resolve().parents[2]
CHAT = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": "2 + 2 = 4."},
]
INPUTS = [
    {"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes."},
    {"messages": CHAT},
    {"raw": "Human: hi Assistant: hello"},
    ("Capital of France?", "Paris."),
    "a plain string is scored as raw text",
]
AS_JSON = [*INPUTS[:3], {"prompt": "Capital of France?", "response": "Paris."}, {"raw": INPUTS[4]}]
KINDS = {"http": RewardClient, "grpc": GrpcRewardClient, "async-http": AsyncRewardClient,
         "async-grpc": AsyncGrpcRewardClient}
FAST = {"backoff_base": 0.01, "backoff_cap": 0.05}


def address(kind: str, server: LiveServer) -> str:
    return server.grpc_target if kind.endswith("grpc") else server.http_url


def use(kind: str, endpoints, action, **options):
    """Build a client of `kind`, run `action(client)` (awaited for the async kinds), close the client."""
    cls = KINDS[kind]
    if kind.startswith("async"):
        async def run():
            async with cls(endpoints, **options) as client:
                return await action(client)

        return asyncio.run(run())
    with cls(endpoints, **options) as client:
        return action(client)


def direct(server: LiveServer, inputs: list[dict]) -> list[dict]:
    reply = httpx.post(f"{server.http_url}/v1/score", json={"inputs": inputs}, timeout=60)
    assert reply.status_code == 200, reply.text
    return reply.json()["scores"]


def requests_seen(server: LiveServer, kind: str, **labels: str) -> float:
    text = httpx.get(f"{server.http_url}/metrics", timeout=10).text
    route = {"transport": "grpc", "route": "Score"} if kind.endswith("grpc") else \
        {"transport": "http", "route": "/v1/score"}
    return metric_value(text, "rewardserve_requests_total", **route, **labels)


# ---- the same rewards everywhere ----------------------------------------------------------------------
def test_all_four_clients_give_identical_rewards(bert_server):
    expected = direct(bert_server, AS_JSON)
    for kind in KINDS:
        results = use(kind, address(kind, bert_server), lambda c: c.score_full(INPUTS))
        assert [r.reward for r in results] == [s["reward"] for s in expected], kind  # bit-identical
        assert [(r.tokens, r.truncated, r.normalized) for r in results] == \
            [(s["tokens"], s["truncated"], None) for s in expected], kind
        rewards = use(kind, address(kind, bert_server), lambda c: c.score(INPUTS))
        assert rewards == [s["reward"] for s in expected], kind


@pytest.mark.parametrize("kind", KINDS)
def test_models_health_ready(bert_server, kind):
    async def check_async(client):
        return await client.models(), await client.health(), await client.ready()

    action = check_async if kind.startswith("async") else lambda c: (c.models(), c.health(), c.ready())
    models, healthy, ready = use(kind, address(kind, bert_server), action)
    assert [(m.id, m.max_model_len, m.normalization) for m in models] == [("tiny-bert", 512, None)]
    assert healthy and ready
    down = "127.0.0.1:%d" % free_port()  # nothing listens there: a closed port
    assert use(kind, down if kind.endswith("grpc") else f"http://{down}", lambda c: c.health()) is False


@pytest.mark.parametrize("kind", KINDS)
def test_chunks_are_reassembled_in_order(bert_server, kind):
    inputs = [f"answer number {i}: {'x' * (i % 7)}" for i in range(1000)]
    expected = [s["reward"] for s in direct(bert_server, [{"raw": t} for t in inputs])]
    rewards = use(kind, address(kind, bert_server), lambda c: c.score(inputs), max_batch_size=64)
    assert len({round(r, 3) for r in expected}) > 100  # distinct enough that a misplaced chunk shows
    assert rewards == pytest.approx(expected, abs=1e-5)  # same input, same score whatever its batch


@pytest.mark.parametrize("kind", KINDS)
def test_a_split_calls_error_names_the_input_in_the_whole_call(bert_server, kind, capsys):
    """Sent as requests of 2, the bad input at position 3 is `inputs.3` (the server said `inputs.1` of its
    request); an async call's other failed requests leave no "never retrieved" tracebacks; a request id that cannot
    travel as a header is refused before anything is sent."""
    bad = {"messages": [{"role": "user", "content": "no answer to score"}]}
    calls = ["ok", "ok", "ok", bad, "ok", bad]
    with pytest.raises(InvalidInputError) as info:
        use(kind, address(kind, bert_server), lambda c: c.score(calls), max_batch_size=2, **FAST)
    assert info.value.message.startswith(("inputs.3.messages", "inputs.5.messages")), info.value.message
    if not kind.startswith("async"):  # sent one request after another: the first failure is the first bad input
        assert info.value.message.startswith("inputs.3.messages") and "inputs.3" in repr(info.value)
    before = requests_seen(bert_server, kind)
    with pytest.raises(InvalidInputError, match="request_id must be printable ASCII"):
        use(kind, address(kind, bert_server), lambda c: c.score(["a"], request_id="a\nb"), **FAST)
    assert requests_seen(bert_server, kind) == before
    assert "never retrieved" not in capsys.readouterr().err


# ---- errors that must not be retried ------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_invalid_input_raises_at_once(bert_server, kind):
    bad = [("fine", "fine"), {"messages": [{"role": "user", "content": "no answer to score"}]}]
    before = requests_seen(bert_server, kind)
    with pytest.raises(InvalidInputError) as info:
        use(kind, address(kind, bert_server), lambda c: c.score(bad), **FAST)
    assert requests_seen(bert_server, kind) - before == 1 and info.value.attempts == 1
    assert "inputs.1.messages" in info.value.message and "assistant" in info.value.message
    assert info.value.code in (422, "INVALID_ARGUMENT") and info.value.type in ("invalid_argument",)

    before = requests_seen(bert_server, kind)
    with pytest.raises(NotFoundError) as info:
        use(kind, address(kind, bert_server), lambda c: c.score(["x"], model="no-such-model"), **FAST)
    assert requests_seen(bert_server, kind) - before == 1 and info.value.attempts == 1
    assert info.value.code in (404, "NOT_FOUND")


@pytest.mark.parametrize("kind", KINDS)
def test_deadline_is_sent_and_not_retried(bert_server, kind):
    with hold_forward(bert_server) as held:
        with pytest.raises(DeadlineExceededError) as info:
            use(kind, address(kind, bert_server), lambda c: c.score(["slow"], timeout=0.2), **FAST)
        assert not held.released, "the call outlived its 0.2 s timeout, waiting for the held forward pass"
    assert info.value.attempts == 1


# ---- transient failures: retried -----------------------------------------------------------------------
class FaultyHttpProxy:
    """An ASGI app in front of the real server: answers the scripted statuses first, then proxies."""

    def __init__(self, upstream: str, script: list[int | None]):
        self.upstream = upstream
        self.script = list(script)  # None: proxied
        self.seen: list[dict[str, str]] = []
        self.peers: list[int] = []  # the client's port of each request: which connection it came on

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        body, more = b"", True
        while more:
            message = await receive()
            body, more = body + message.get("body", b""), message.get("more_body", False)
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        self.seen.append(headers)
        self.peers.append(scope["client"][1])
        status = self.script.pop(0) if self.script else None
        if status is not None:
            kind = {429: "overloaded", 503: "unavailable", 504: "deadline_exceeded"}.get(status, "error")
            content = json.dumps({"error": {"type": kind, "message": "injected", "code": status}})
        else:
            forward = {k: v for k, v in headers.items() if k in ("content-type", "x-request-timeout", "x-request-id")}
            async with httpx.AsyncClient() as client:
                reply = await client.request(scope["method"], self.upstream + scope["path"], content=body,
                                             headers=forward, timeout=30)
            status, content = reply.status_code, reply.text
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": content.encode()})


class ThreadedHttp:
    def __init__(self, app):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self):
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.mark.parametrize("kind", ["http", "async-http"])
def test_http_overload_and_draining_are_retried(bert_server, kind):
    expected = [s["reward"] for s in direct(bert_server, AS_JSON)]
    proxy = FaultyHttpProxy(bert_server.http_url, [503, 429, 503])
    with ThreadedHttp(proxy) as front:
        rewards = use(kind, front.url, lambda c: c.score(INPUTS, request_id="job-7"), api_key="k", **FAST)
    assert rewards == expected
    assert len(proxy.seen) == 4
    assert {h["x-request-id"] for h in proxy.seen} == {"job-7"}  # one id for every attempt of the call
    assert {h["authorization"] for h in proxy.seen} == {"Bearer k"}
    left = [float(h["x-request-timeout"]) for h in proxy.seen]
    assert left == sorted(left, reverse=True) and left[0] <= 60  # the time left, shrinking


@pytest.mark.parametrize("kind", ["http", "async-http"])
def test_http_retries_give_up(bert_server, kind):
    proxy = FaultyHttpProxy(bert_server.http_url, [429] * 10)
    with ThreadedHttp(proxy) as front:
        with pytest.raises(OverloadedError) as info:
            use(kind, front.url, lambda c: c.score(["x"]), max_retries=2, **FAST)
        assert info.value.attempts == 3 == len(proxy.seen)
        proxy.script, proxy.seen = [504], []  # our server's 504: the deadline passed, never retried
        with pytest.raises(DeadlineExceededError):
            use(kind, front.url, lambda c: c.score(["x"]), **FAST)
        assert len(proxy.seen) == 1


class FaultyGrpc(reward_pb2_grpc.RewardServiceServicer):
    """A gRPC RewardService in front of the real one: aborts with the scripted codes first, then proxies."""

    def __init__(self, upstream: str, script: list[grpc.StatusCode]):
        self.script = list(script)
        self.seen: list[tuple[str, dict]] = []
        self.upstream = reward_pb2_grpc.RewardServiceStub(grpc.insecure_channel(upstream))

    def Score(self, request, context):
        self.seen.append((request.request_id, dict(context.invocation_metadata())))
        if self.script:
            context.abort(self.script.pop(0), "injected")
        return self.upstream.Score(request, timeout=context.time_remaining())


def grpc_front(servicer: FaultyGrpc) -> tuple[grpc.Server, str]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reward_pb2_grpc.add_RewardServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, f"127.0.0.1:{port}"


@pytest.mark.parametrize("kind", ["grpc", "async-grpc"])
def test_grpc_unavailable_and_exhausted_are_retried(bert_server, kind):
    expected = [s["reward"] for s in direct(bert_server, AS_JSON)]
    codes = grpc.StatusCode
    servicer = FaultyGrpc(bert_server.grpc_target, [codes.UNAVAILABLE, codes.RESOURCE_EXHAUSTED])
    server, target = grpc_front(servicer)
    try:
        rewards = use(kind, target, lambda c: c.score(INPUTS, request_id="job-8"), api_key="k", **FAST)
        assert rewards == expected
        assert [rid for rid, _ in servicer.seen] == ["job-8"] * 3
        assert {md["authorization"] for _, md in servicer.seen} == {"Bearer k"}
        servicer.script, servicer.seen = [codes.INVALID_ARGUMENT], []
        with pytest.raises(InvalidInputError):
            use(kind, target, lambda c: c.score(["x"]), **FAST)
        assert len(servicer.seen) == 1
    finally:
        server.stop(0)


@pytest.mark.parametrize("kind", KINDS)
def test_closed_port_is_retried_then_skipped(bert_server, kind):
    port = free_port()  # nothing listens there: a closed port
    down = f"127.0.0.1:{port}" if kind.endswith("grpc") else f"http://127.0.0.1:{port}"
    with pytest.raises(UnavailableError) as info:
        use(kind, down, lambda c: c.score(["x"]), max_retries=2, **FAST)
    assert info.value.attempts == 3 and info.value.endpoint == down
    expected = [s["reward"] for s in direct(bert_server, AS_JSON)]
    both = [down, address(kind, bert_server)]
    assert use(kind, both, lambda c: c.score(INPUTS), max_retries=0) == expected  # failover is free


# ---- processes and event loops ------------------------------------------------------------------------
def test_a_forked_child_opens_its_own_connection(bert_server):
    """A client used before fork(): each child sends on a connection of its own while the parent goes on using
    its pooled keep-alive one (children shared the parent's socket: processes read each other's answers, or
    garbled the stream into uvicorn's "400 Invalid HTTP request")."""
    ctx = multiprocessing.get_context("fork")
    texts = [f"text number {i}" for i in range(8)]
    proxy = FaultyHttpProxy(bert_server.http_url, [])
    with ThreadedHttp(proxy) as front, RewardClient(front.url, timeout=30) as client:
        expected = client.score(texts)  # the parent's connection is now pooled
        parent_port = proxy.peers[-1]

        def wrong_answers(k: int) -> int:
            picks = [(k + j) % len(texts) for j in range(20)]
            return sum(abs(client.score([texts[i]])[0] - expected[i]) > 1e-5 for i in picks)

        def child(k: int, out) -> None:
            try:
                out.put((k, wrong_answers(k), None))
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                out.put((k, None, repr(exc)))

        out = ctx.Queue()
        children = [ctx.Process(target=child, args=(k, out)) for k in range(3)]
        for process in children:
            process.start()
        parent_wrong = wrong_answers(5)  # meanwhile
        results = sorted(out.get(timeout=60) for _ in children)
        for process in children:
            process.join(timeout=10)
    assert parent_wrong == 0 and results == [(k, 0, None) for k in range(3)]
    assert sum(port != parent_port for port in proxy.peers) == 60  # every child request: a child's connection


@pytest.mark.parametrize("kind", ["async-http", "async-grpc"])
def test_an_async_client_serves_one_event_loop_after_another(bert_server, kind):
    """Each asyncio.run is a new loop: the client opens connections in it and closes them when it ends (a second
    asyncio.run raised a bare RuntimeError "Event loop is closed"); after close() it says it is closed."""
    expected = [s["reward"] for s in direct(bert_server, AS_JSON)]
    client = KINDS[kind](address(kind, bert_server), **FAST)
    assert asyncio.run(client.score(INPUTS)) == expected
    assert asyncio.run(client.score(INPUTS, timeout=10)) == expected
    assert asyncio.run(client.ready())
    asyncio.run(client.close())
    with pytest.raises(ClientClosedError, match="closed"):
        asyncio.run(client.score(INPUTS))


# ---- failover while a server stops ---------------------------------------------------------------------
def hammer(kind: str, endpoints: list[str], expected: list[float], stop: threading.Event, calls: dict,
           failures: list) -> None:
    """Score in a loop until `stop`, counting calls and keeping every failure."""

    def check(rewards):
        calls[kind] += 1
        # four clients hammer at once, so their inputs share batches: equal within the 1e-5 batch-invariance
        # contract, not bit for bit
        if len(rewards) != len(expected) or any(abs(a - b) > 1e-5 for a, b in zip(rewards, expected)):
            failures.append((kind, f"wrong rewards {rewards} != {expected}"))

    if kind.startswith("async"):
        async def run():
            async with KINDS[kind](endpoints, cooldown_s=0.02, **FAST) as client:
                while not stop.is_set():
                    try:
                        check(await client.score(INPUTS))
                    except Exception as exc:  # noqa: BLE001 - every failure is the test's business
                        failures.append((kind, repr(exc)))

        asyncio.run(run())
        return
    with KINDS[kind](endpoints, cooldown_s=0.02, **FAST) as client:  # short: the dead one is tried often
        while not stop.is_set():
            try:
                check(client.score(INPUTS))
            except Exception as exc:  # noqa: BLE001
                failures.append((kind, repr(exc)))


def wait_for(predicate, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "condition not reached in time"
        time.sleep(0.01)


def test_failover_when_a_server_stops_mid_loop(bert_server, tiny_bert_dir):
    expected = [s["reward"] for s in direct(bert_server, AS_JSON)]
    second = LiveServer(test_config(tiny_bert_dir, model_name="tiny-bert")).__enter__()
    stop, failures = threading.Event(), []
    calls = {kind: 0 for kind in KINDS}
    threads = [
        threading.Thread(target=hammer, args=(kind, [address(kind, second), address(kind, bert_server)],
                                              expected, stop, calls, failures))
        for kind in KINDS
    ]
    try:
        for thread in threads:
            thread.start()
        wait_for(lambda: min(calls.values()) >= 5)
        second.stop()  # drains (503 / UNAVAILABLE), then closes its ports, while the loops go on
        after_stop = dict(calls)
        wait_for(lambda: all(calls[k] >= after_stop[k] + 20 for k in KINDS))
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        second.stop()
    assert failures == []


# ---- light: no torch, no transformers, no service -----------------------------------------------------
CLIENT_BLOCKED = {"torch", "transformers", "numpy", "fastapi", "pydantic", "pydantic_core", "service", "starlette",
                  "uvicorn", "tokenizers", "grpc_health", "prometheus_client"}
BLOCKED_IMPORTS = """
import sys
from clients import GrpcRewardClient, RewardClient
with RewardClient(sys.argv[1]) as client:
    rewards = client.score([("How do I boil an egg?", "Simmer it."), "raw text"])
    assert client.ready()
with GrpcRewardClient(sys.argv[2]) as client:
    assert client.score([("How do I boil an egg?", "Simmer it."), "raw text"]) == rewards
    assert client.ready()
leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
assert not leaked, leaked
print(repr(rewards))
"""


def test_clients_import_without_torch_transformers_or_service(bert_server):
    out = run_with_imports_blocked(
        CLIENT_BLOCKED, BLOCKED_IMPORTS, bert_server.http_url, bert_server.grpc_target, cwd=ROOT
    )
    assert out.returncode == 0, out.stderr
    expected = [s["reward"] for s in direct(bert_server, [{"prompt": "How do I boil an egg?", "response": "Simmer it."},
                                                          {"raw": "raw text"}])]
    assert eval(out.stdout.strip()) == expected  # noqa: S307 - a list of floats we printed
