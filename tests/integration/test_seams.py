"""The seams between the transports and the engine (issue #13): one admission path, a tokenizer nobody
reconfigures, bounds on every queue, typed JSON errors, a clean start and stop, no hidden global state."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import grpc
import httpx
import pytest

from protos import reward_pb2, reward_pb2_grpc
from service.errors import ErrorKind, RewardServeError
from tests.helpers import LiveServer, gated_worker, test_config

LONG = " ".join(f"word{i}" for i in range(400))


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    config = test_config(tiny_llama_dir, model_name="tiny-llama", max_queue=8, max_stream_in_flight=2,
                         max_tokens=64)
    with LiveServer(config) as live:
        yield live


# ---- 1. the shared tokenizer ------------------------------------------------------------------------------
async def _mixed_traffic(server, rounds: int) -> tuple[list, list]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as client:
        async def pooling() -> list:
            return [await client.post("/pooling", json={"input": LONG, "truncate_prompt_tokens": 5,
                                                        "use_activation": False}) for _ in range(rounds)]

        async def scoring() -> list:
            return [await client.post("/v1/score", json={"inputs": [{"raw": LONG}]}) for _ in range(rounds)]

        parts = await asyncio.gather(pooling(), scoring(), pooling(), scoring())
    return parts[0] + parts[2], parts[1] + parts[3]


def test_vllm_truncation_never_reaches_the_shared_tokenizer(server):
    """/pooling's tokenizer-side truncation runs on a private clone: /v1/score inputs stay cut from the LEFT at
    the model's limit and say so, and every pooling answer keeps exactly 5 tokens."""
    pools, scores = asyncio.run(_mixed_traffic(server, rounds=12))
    for r in pools:
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["prompt_tokens"] == 5
    for r in scores:
        assert r.status_code == 200, r.text
        (s,) = r.json()["scores"]
        assert s["tokens"] == 64 and s["truncated"] is True
    backend = server.engine.tokenizer.backend_tokenizer
    assert backend.truncation is None and backend.padding is None


# ---- 2. one admission path -----------------------------------------------------------------------------------
def test_overload_is_refused_before_any_tokenizing(server):
    engine = server.engine
    calls = []
    original = engine.default_encoder
    engine.default_encoder = lambda inp: calls.append(inp) or original(inp)
    try:
        reservation = engine.batcher.reserve(engine.config.max_queue)  # the queue is full
        try:
            with pytest.raises(RewardServeError) as err:
                server.call(engine.score([{"raw": "hello"}]))
            assert err.value.kind is ErrorKind.OVERLOADED and calls == []
            r = httpx.post(server.http_url + "/v1/score", json={"inputs": [{"raw": "hello"}]}, timeout=30)
            assert r.status_code == 429 and r.json()["error"]["type"] == "overloaded" and calls == []
        finally:
            reservation.release()
        assert server.call(engine.score([{"raw": "hello"}])).results and len(calls) == 1
    finally:
        engine.default_encoder = original


def test_the_engine_has_no_unchecked_entry():
    from service.engine import RewardEngine

    public = {name for name in vars(RewardEngine) if not name.startswith("_")}
    assert "score_ids" not in public
    assert {"admit", "score", "encode"} <= public


def test_best_of_n_generation_counts_against_the_queue(tiny_llama_dir):
    """Candidates being generated hold their queue room: a full house refuses other work with 429, and the
    room comes back when the request ends."""
    from service.bon import BestOfN
    from service.generation.base import Generation

    release = threading.Event()

    class SlowGenerator:
        name = "slow"

        async def generate(self, messages, sampling, deadline):
            await asyncio.to_thread(release.wait, 30)
            return [Generation(f"candidate {i}", "stop") for i in range(sampling.n)]

        def close(self):
            pass

    with LiveServer(test_config(tiny_llama_dir, max_queue=4, max_n=4)) as live:
        live.runtime.app.state.bon.generator = SlowGenerator()  # fault injection: a generator that takes its time

        async def flow():
            async with httpx.AsyncClient(base_url=live.http_url, timeout=60) as client:
                bon = asyncio.ensure_future(client.post("/v1/best-of-n", json={"prompt": "hi", "n": 4}))
                while live.engine.batcher.depth < 4:
                    await asyncio.sleep(0.01)
                refused = await client.post("/v1/score", json={"inputs": [{"raw": "hello"}]})
                release.set()
                return await bon, refused

        bon, refused = asyncio.run(flow())
        assert refused.status_code == 429, refused.text
        assert bon.status_code == 200 and len(bon.json()["candidates"]) == 4
        assert live.engine.batcher.depth == 0
        assert isinstance(live.runtime.app.state.bon, BestOfN)


# ---- 3. the event loop and the bounds ----------------------------------------------------------------------
def test_a_large_request_is_tokenized_off_the_event_loop(server):
    engine = server.engine
    threads = []
    original = engine.default_encoder
    engine.default_encoder = lambda inp: threads.append(threading.current_thread().name) or original(inp)
    try:
        small = httpx.post(server.http_url + "/v1/score", json={"inputs": [{"raw": "hi"}]}, timeout=30)
        big = httpx.post(server.http_url + "/v1/score", json={"inputs": [{"raw": "x " * 200_000}]}, timeout=60)
    finally:
        engine.default_encoder = original
    assert small.status_code == big.status_code == 200
    assert threads[0] == "live-server"  # a small request is tokenized inline: no thread hop
    assert threads[1].startswith("rewardserve-tokenize")  # one large input: never on the loop


def test_a_score_stream_holds_at_most_its_bound_in_flight(server):
    """max_stream_in_flight=2: with the worker held, a stream of 6 requests admits 2; the rest wait unread."""
    with gated_worker(server) as (entered, gate):
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            requests = [reward_pb2.ScoreRequest(inputs=[reward_pb2.ScoreInput(raw=f"text {i}")], request_id=str(i))
                        for i in range(6)]
            stream = stub.ScoreStream(iter(requests), timeout=60)
            assert entered.wait(30)
            time.sleep(0.3)
            assert server.engine.batcher.depth <= 2
            gate.set()
            answers = list(stream)
    assert sorted(a.request_id for a in answers) == [str(i) for i in range(6)]


def test_a_request_without_a_key_is_refused_before_its_body_is_read(tiny_bert_dir):
    with LiveServer(test_config(tiny_bert_dir, api_keys=["k"], max_body_bytes=1024)) as live:
        with socket.create_connection(("127.0.0.1", live.runtime.http_port), timeout=10) as sock:
            # a huge declared body, never sent: the key check answers first (401, not 413, no waiting)
            sock.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 100000000\r\n\r\n")
            head = sock.recv(4096).decode()
    assert head.startswith("HTTP/1.1 401"), head
    assert "content-type: application/json" in head


def test_http_requests_in_flight_are_bounded(tiny_bert_dir):
    with LiveServer(test_config(tiny_bert_dir, max_http_in_flight=2)) as live:
        with gated_worker(live) as (entered, gate):
            async def flow():
                async with httpx.AsyncClient(base_url=live.http_url, timeout=60) as client:
                    held = [asyncio.ensure_future(client.post("/v1/score", json={"inputs": [{"raw": f"t{i}"}]}))
                            for i in range(2)]
                    await asyncio.to_thread(entered.wait, 30)
                    await asyncio.sleep(0.2)
                    third = await client.post("/v1/score", json={"inputs": [{"raw": "t3"}]})
                    probes = [(await client.get(path)).status_code for path in ("/health", "/ready", "/metrics")]
                    gate.set()
                    return third, probes, await asyncio.gather(*held)

            third, probes, held = asyncio.run(flow())
    assert third.status_code == 503 and third.json()["error"]["type"] == "unavailable"
    assert probes == [200, 200, 200]  # probes and scrapes are answered however busy: a busy pod is not restarted
    assert [r.status_code for r in held] == [200, 200]


def test_a_taken_port_is_one_line_not_a_traceback(tiny_bert_dir):
    """HTTP and gRPC alike: the port's owner keeps it (gRPC would share it through SO_REUSEPORT), and the second
    server stops with the address named."""
    from service.runtime import bind_socket

    taken = bind_socket("127.0.0.1", 0)
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ValueError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
            bind_socket("127.0.0.1", port)
        with LiveServer(test_config(tiny_bert_dir, grpc_port=0, warmup=False)) as first:
            with pytest.raises(ValueError, match=f"cannot listen for gRPC on 127.0.0.1:{first.runtime.grpc_port}"):
                with LiveServer(test_config(tiny_bert_dir, grpc_port=first.runtime.grpc_port, warmup=False)):
                    pass
    finally:
        taken.close()


# ---- 5. errors: one table, JSON always ------------------------------------------------------------------
STRICT_TEMPLATE = (
    "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
)


@pytest.fixture(scope="module")
def strict_template_dir(tmp_path_factory, tiny_llama_dir):
    """The tiny Llama RM with a chat template that raises on roles that do not alternate (as Llama-2's does)."""
    import shutil

    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("strict-template-rm")
    for path in Path(tiny_llama_dir).iterdir():
        shutil.copy(path, out / path.name)
    tok = AutoTokenizer.from_pretrained(str(out))
    tok.chat_template = STRICT_TEMPLATE
    tok.save_pretrained(out)
    return out


def test_a_conversation_the_template_rejects_is_a_400_everywhere(strict_template_dir):
    bad = [{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}]
    with LiveServer(test_config(strict_template_dir)) as live:
        r = httpx.post(live.http_url + "/v1/score", json={"inputs": [{"messages": bad}]}, timeout=30)
        assert r.status_code == 400 and "inputs.0: " in r.json()["error"]["message"]
        assert "alternate" in r.json()["error"]["message"]
        context = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
        r = httpx.post(live.http_url + "/v1/rerank", json={"messages": context, "candidates": ["x"]}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["message"].startswith("candidates.0: ")
        with grpc.insecure_channel(live.grpc_target) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            conversation = reward_pb2.Conversation(messages=[reward_pb2.Message(**m) for m in bad])
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(reward_pb2.ScoreRequest(inputs=[reward_pb2.ScoreInput(conversation=conversation)]),
                           timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("rewardserve-error-type", "invalid_argument") in tuple(err.value.trailing_metadata())


def test_anything_unexpected_is_a_typed_json_500(server):
    """A bug of ours (here injected into the encoder) answers the JSON error body, never plain text."""
    engine = server.engine
    original = engine.default_encoder

    def broken(inp):
        raise KeyError("a bug")

    engine.default_encoder = broken
    try:
        r = httpx.post(server.http_url + "/v1/score", json={"inputs": [{"raw": "hi"}]}, timeout=30)
        with grpc.insecure_channel(server.grpc_target) as channel:
            stub = reward_pb2_grpc.RewardServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:
                stub.Score(reward_pb2.ScoreRequest(inputs=[reward_pb2.ScoreInput(raw="hi")]), timeout=30)
    finally:
        engine.default_encoder = original
    assert r.status_code == 500 and r.headers["content-type"] == "application/json"
    assert r.json()["error"]["type"] == "internal"
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert ("rewardserve-error-type", "internal") in tuple(err.value.trailing_metadata())


def test_every_error_kind_has_one_distinct_type_and_both_codes():
    from service.error_map import GRPC_STATUS, HTTP_STATUS, http_error

    assert len({kind.value for kind in ErrorKind}) == len(ErrorKind)
    for kind in ErrorKind:
        status, body = http_error(kind, "m")
        assert status == HTTP_STATUS[kind] and kind in GRPC_STATUS
        assert b'"type": "' + kind.value.encode() in body
    assert HTTP_STATUS[ErrorKind.NOT_IMPLEMENTED] == 501
    assert GRPC_STATUS[ErrorKind.NOT_IMPLEMENTED] == grpc.StatusCode.UNIMPLEMENTED


# ---- 6. start and stop -----------------------------------------------------------------------------------
def test_a_taken_port_is_said_before_the_model_loads(tmp_path):
    """The ports are checked first: the error comes at once (here the model folder does not even exist)."""
    from service.runtime import Runtime

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        for config in (test_config(tmp_path / "absent", port=port), test_config(tmp_path / "absent", grpc_port=port)):
            which = "HTTP" if config.port == port else "gRPC"
            with pytest.raises(ValueError, match=f"cannot listen for {which} on 127.0.0.1:{port}"):
                asyncio.run(Runtime(config).start())


def test_environment_warnings_name_typos_and_the_clients_key():
    from service.runtime import environment_warnings

    env = {"REWARDSERVE_MAX_QUEU": "5", "REWARDSERVE_URL": "http://x", "REWARDSERVE_MAX_QUEUE": "5",
           "REWARDSERVE_API_KEY": "secret"}
    warnings = environment_warnings(False, env)
    assert warnings[0] == "REWARDSERVE_MAX_QUEU is not a setting (ignored): did you mean REWARDSERVE_MAX_QUEUE?"
    assert len(warnings) == 2 and warnings[1].startswith("REWARDSERVE_API_KEY is set, but it is the clients' key")
    assert environment_warnings(True, {"REWARDSERVE_API_KEY": "k"}) == []


def test_a_failed_http_bind_stops_what_had_started(tiny_bert_dir, monkeypatch):
    """The port is taken after the early check (monkeypatched away here): binding it for real fails, and what had
    started is stopped."""
    import service.runtime
    from service.runtime import Runtime

    monkeypatch.setattr(service.runtime, "check_ports", lambda config: None)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        runtime = Runtime(test_config(tiny_bert_dir, port=port, warmup=False))

        async def start():
            with pytest.raises(ValueError, match=f"cannot listen for HTTP on 127.0.0.1:{port}"):
                await runtime.start()

        asyncio.run(start())
    assert runtime.engine.accepting is False and not runtime.engine.batcher._thread.is_alive()
    with pytest.raises(grpc.RpcError):  # the gRPC server that had started is gone
        with grpc.insecure_channel(f"127.0.0.1:{runtime.grpc_port}") as channel:
            reward_pb2_grpc.RewardServiceStub(channel).ListModels(reward_pb2.ListModelsRequest(), timeout=2)


# ---- 7. no hidden global state ------------------------------------------------------------------------------
def test_loading_a_model_leaves_the_callers_rng_and_threads_alone(tiny_llama_dir):
    import torch

    from service.backends.hf_backend import HFBackend

    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        HFBackend(test_config(tiny_llama_dir, threads=2))  # an overlay or untrained head is seeded inside
        assert torch.get_num_threads() == 1
        assert torch.equal(torch.rand(3), expected)
    finally:
        torch.set_num_threads(threads)
