"""HTTP transport against a real uvicorn server on loopback, tiny BERT reward model."""

import asyncio
import socket
import time

import httpx
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from tests.helpers import LiveServer, hold_forward, inject_latency, metric_value, test_config

PAIR = {"prompt": "How do I boil an egg?", "response": "Put it in boiling water for nine minutes."}
MSGS = {"messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
]}
RAW = {"raw": "Human: hi Assistant: hello"}


def score(server, inputs, **extra):
    return httpx.post(server.http_url + "/v1/score", json={"inputs": inputs, **extra}, timeout=60)


def test_scores_are_raw_logits_in_input_order(bert_server, tiny_bert_dir):
    inputs = [PAIR, MSGS, RAW, PAIR]
    r = score(bert_server, inputs)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "tiny-bert"
    assert [set(s) >= {"reward", "truncated", "tokens"} for s in body["scores"]] == [True] * 4
    # the same texts through plain transformers, one at a time: the raw logit, no sigmoid
    tok = AutoTokenizer.from_pretrained(tiny_bert_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir).eval()
    texts = [
        "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in boiling water for nine minutes.",
        "\n\nSystem: You are terse.\n\nHuman: Capital of France?\n\nAssistant: Paris.",
        "Human: hi Assistant: hello",
    ]
    with torch.inference_mode():
        expected = [model(**tok(t, return_tensors="pt")).logits[0, 0].item() for t in texts]
    got = [s["reward"] for s in body["scores"]]
    assert got[:3] == pytest.approx(expected, rel=1e-4, abs=1e-5)  # our forward vs transformers': float noise
    assert got[0] == got[3]  # same input, another row of the batch: the same bits
    assert [s["tokens"] for s in body["scores"][:3]] == [len(tok(t)["input_ids"]) for t in texts]


def test_timing_and_request_id_headers(bert_server):
    r = httpx.post(bert_server.http_url + "/v1/score", json={"inputs": [PAIR]}, headers={"X-Request-Id": "abc-1"})
    assert r.status_code == 200
    assert r.headers["x-request-id"] == "abc-1"
    assert float(r.headers["x-queue-time-ms"]) >= 0 and float(r.headers["x-compute-time-ms"]) > 0
    assert len(httpx.get(bert_server.http_url + "/health").headers["x-request-id"]) == 32


def test_truncation_is_reported(bert_server):
    long = {"prompt": "word " * 2000, "response": "the end"}
    r = score(bert_server, [long, PAIR])
    first, second = r.json()["scores"]
    assert first["truncated"] is True and first["tokens"] == 512
    assert second["truncated"] is False


def test_operational_routes(bert_server):
    url = bert_server.http_url
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.get(url + "/ready").json()["status"] == "ready"
    models = httpx.get(url + "/v1/models").json()
    assert models["data"][0]["id"] == "tiny-bert" and models["data"][0]["max_model_len"] == 512
    spec = httpx.get(url + "/openapi.json").json()
    assert "/v1/score" in spec["paths"]
    assert httpx.get(url + "/docs").status_code == 200
    score(bert_server, [PAIR])
    text = httpx.get(url + "/metrics").text
    for name in (
        "rewardserve_requests_total", "rewardserve_request_latency_seconds_bucket",
        "rewardserve_queue_wait_seconds_bucket", "rewardserve_batch_size_bucket",
        "rewardserve_batch_tokens_bucket", "rewardserve_padding_ratio_bucket", "rewardserve_queue_depth",
        "rewardserve_in_flight_requests", "rewardserve_reward_bucket", "rewardserve_inputs_total",
    ):
        assert name in text, name
    assert metric_value(text, "rewardserve_requests_total", route="/v1/score", code="200") >= 1


BAD = [
    ({"inputs": []}, 422, "inputs"),
    ({}, 422, "inputs: Field required"),
    ({"inputs": [{"prompt": "a"}]}, 422, "inputs.0.response"),
    ({"inputs": [{"foo": "a"}]}, 422, "'prompt' and 'response', or 'messages', or 'raw'"),
    ({"inputs": [{"messages": [{"role": "bot", "content": "x"}]}]}, 422, "inputs.0.messages.0.role"),
    ({"inputs": [{"messages": [{"role": "user", "content": "x"}]}]}, 422, "last message must have role 'assistant'"),
    ({"inputs": [{"messages": []}]}, 422, "inputs.0.messages"),
    ({"inputs": [{"raw": 5}]}, 422, "inputs.0.raw"),
    ({"inputs": "abc"}, 422, "inputs"),
    ({"inputs": [PAIR], "extra": 1}, 422, "extra"),
    ({"inputs": [PAIR], "timeout": -1}, 422, "timeout"),
    ({"model": "other-model", "inputs": [PAIR]}, 404, "unknown model 'other-model'"),
    ({"inputs": [PAIR, PAIR], "groups": [[True, False]]}, 422, "groups.0.0"),  # not indices, whatever Python says
    ({"inputs": [PAIR, PAIR], "groups": [[0.0, 1.0]]}, 422, "groups.0.0"),
    ({"inputs": [PAIR], "normalize": "yes"}, 422, "normalize"),
]


@pytest.mark.parametrize("body,code,needle", BAD)
def test_bad_input_gets_a_clear_4xx(bert_server, body, code, needle):
    r = httpx.post(bert_server.http_url + "/v1/score", json=body)
    assert r.status_code == code, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["code"] == code


@pytest.mark.parametrize("raw", [b"not json", b'{"inputs": [{"raw": "\xff\xfe"}]}', b"", b"[1,2]", b'{"inputs": [{"raw": "a"}'])
def test_malformed_bodies_are_4xx(bert_server, raw):
    r = httpx.post(bert_server.http_url + "/v1/score", content=raw, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert r.json()["error"]["type"] == "invalid_argument"


BODIES = [  # (body, content-type, status, what the message says)
    (b'{"inputs": [', "application/json", 400, "the request body is not valid JSON: Expecting value at character 12"),
    (b"not json", "application/json", 400, "the request body is not valid JSON"),
    (b"", "application/json", 422, "the request body is empty (or null)"),
    (b"null", "application/json", 422, "the request body is empty (or null)"),
    (b"[1, 2]", "application/json", 422, "the request body must be a JSON object, got list"),
    (b'{"inputs": [{"raw": "a"}]}', "text/plain", 400, "must be JSON (content-type application/json), got "
                                                       "content-type 'text/plain'"),
    (b'{"inputs": [{"raw": "a"}]}', "application/x-www-form-urlencoded", 400, "must be JSON"),  # curl -d alone
]


@pytest.mark.parametrize("route", ["/v1/score", "/get_reward"])
@pytest.mark.parametrize("raw,content_type,code,needle", BODIES)
def test_a_wrong_body_is_named_as_such(bert_server, route, raw, content_type, code, needle):
    r = httpx.post(bert_server.http_url + route, content=raw, headers={"content-type": content_type})
    assert r.status_code == code and needle in r.json()["error"]["message"], r.text


def test_a_body_without_content_type_is_read_as_json(bert_server):
    """As vLLM's routes read it: the same answer as with `content-type: application/json`."""
    body = b'{"inputs": [{"prompt": "a", "response": "b"}]}'
    bare = httpx.Client().send(httpx.Request("POST", bert_server.http_url + "/v1/score", content=body))
    with_type = httpx.post(bert_server.http_url + "/v1/score", content=body,
                           headers={"content-type": "application/json"})
    assert "content-type" not in bare.request.headers
    assert bare.status_code == 200 and bare.json()["scores"] == with_type.json()["scores"]


def test_unknown_route_and_method(bert_server):
    r = httpx.get(bert_server.http_url + "/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found"
    r = httpx.get(bert_server.http_url + "/v1/score")
    assert r.status_code == 405 and r.json()["error"]["type"] == "method_not_allowed"


@pytest.mark.parametrize("value,shown", [(b"soon", "'soon'"), (b"inf", "'inf'"), (b"1e309", "'1e309'"),
                                         (b"nan", "'nan'"), (b"-1", "'-1'"), ("5é".encode(), "'5é'")])
def test_bad_timeout_header(bert_server, value, shown):
    r = httpx.post(bert_server.http_url + "/v1/score", json={"inputs": [PAIR]}, headers={"X-Request-Timeout": value})
    message = r.json()["error"]["message"]
    assert r.status_code == 400 and message.startswith("X-Request-Timeout must be") and message.endswith(shown)


@pytest.fixture(scope="module")
def limited_server(tiny_bert_dir):
    cfg = test_config(tiny_bert_dir, model_name="tiny-bert", grpc_port=-1, max_body_bytes=4096,
                      max_inputs_per_request=4, max_queue=8, max_batch_size=4)
    with LiveServer(cfg) as server:
        yield server


def test_limits(limited_server):
    r = score(limited_server, [PAIR] * 5)
    assert r.status_code == 400 and "inputs: 5 entries, more than max_inputs_per_request=4" in r.json()["error"]["message"]
    r = score(limited_server, [{"raw": "x" * 5000}])
    assert r.status_code == 413 and "max_body_bytes=4096" in r.json()["error"]["message"]
    # chunked upload without content-length is counted too
    r = httpx.post(limited_server.http_url + "/v1/score", content=iter([b"{" + b" " * 3000, b" " * 3000 + b"}"]))
    assert r.status_code == 413
    assert score(limited_server, [PAIR] * 4).status_code == 200  # the server is fine afterwards


def test_a_client_stalled_mid_body_is_answered_408_and_frees_its_slot(tiny_bert_dir):
    """Clients that send half a body and stall held their max_http_in_flight slots for good: everyone else got
    503. Past http_body_timeout_s they are answered 408 and disconnected."""
    cfg = test_config(tiny_bert_dir, model_name="tiny-bert", grpc_port=-1, max_http_in_flight=2,
                      http_body_timeout_s=1.0)
    with LiveServer(cfg) as server:
        stalled = []
        for _ in range(2):
            sock = socket.create_connection(("127.0.0.1", server.runtime.http_port))
            sock.sendall(b"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: 100\r\n\r\n{\"inputs\": [")
            stalled.append(sock)
        time.sleep(0.3)
        assert score(server, [PAIR]).status_code == 503  # both slots are held by the stalled clients
        for sock in stalled:
            sock.settimeout(10)
            reply = b""
            while chunk := sock.recv(4096):  # read until the server closes the connection
                reply += chunk
            sock.close()
            assert reply.startswith(b"HTTP/1.1 408") and b"http_body_timeout_s=1 s" in reply
        assert score(server, [PAIR]).status_code == 200

        def counted(code: str) -> float:
            text = httpx.get(server.http_url + "/metrics").text
            return metric_value(text, "rewardserve_requests_total", transport="http", route="/v1/score", code=code)

        before = {code: counted(code) for code in ("408", "499", "500")}
        assert before["408"] == 2
        gone = socket.create_connection(("127.0.0.1", server.runtime.http_port))  # closes mid-body: nobody answered
        gone.sendall(b"POST /v1/score HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{")
        time.sleep(0.2)
        gone.close()
        deadline = time.monotonic() + 10
        while counted("499") == before["499"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counted("499") == before["499"] + 1 and counted("500") == before["500"]  # the client's doing


async def test_full_queue_answers_429_at_once(limited_server):
    """Refusals do not wait for queued work: with the model held, the queue (8 inputs, 2 requests of 4) fills,
    and the other 4 requests are answered 429 while the admitted ones are still in the held forward pass."""
    async with httpx.AsyncClient(base_url=limited_server.http_url, timeout=60) as client:
        with hold_forward(limited_server) as held:
            tasks = [asyncio.ensure_future(client.post("/v1/score", json={"inputs": [PAIR] * 4})) for _ in range(6)]
            refused: set = set()
            while len(refused) < 4:
                done, _ = await asyncio.wait([t for t in tasks if t not in refused], timeout=60,
                                             return_when=asyncio.FIRST_COMPLETED)
                assert done, "no answer while the model was held"
                refused |= done
            assert not held.released, "a refusal waited for the forward pass"
            assert len(refused) == 4
            for t in refused:
                r = t.result()
                assert r.status_code == 429, r.text
                assert "queue full" in r.json()["error"]["message"]
            held.release()
            admitted = [await t for t in tasks if t not in refused]
    assert [r.status_code for r in admitted] == [200, 200]


@pytest.mark.parametrize("how", ["body", "header"])
def test_deadline_gives_504(limited_server, how):
    kwargs = {"json": {"inputs": [PAIR], "timeout": 0.05}} if how == "body" else {
        "json": {"inputs": [PAIR]}, "headers": {"X-Request-Timeout": "0.05"}}
    with hold_forward(limited_server) as held:
        r = httpx.post(limited_server.http_url + "/v1/score", timeout=60, **kwargs)
        assert not held.released, "the 504 waited for the forward pass"
    assert r.status_code == 504, r.text
    assert r.json()["error"]["type"] == "deadline_exceeded"


def test_the_warm_up_is_no_traffic(tiny_bert_dir):
    """The start-up pass through the whole path is not counted as scored inputs or rewards (every restart would
    add synthetic rewards to the reward histogram): a fresh model's counters start at the first request."""
    with LiveServer(test_config(tiny_bert_dir, model_name="warm-only", grpc_port=-1)) as server:
        before = httpx.get(server.http_url + "/metrics").text
        score(server, [PAIR, RAW, PAIR])
        after = httpx.get(server.http_url + "/metrics").text
    assert metric_value(before, "rewardserve_inputs_total", model="warm-only") == 0
    assert metric_value(before, "rewardserve_reward_count", model="warm-only") == 0
    assert metric_value(after, "rewardserve_inputs_total", model="warm-only") == 3


def test_compute_time_sums_the_passes_of_a_request(tiny_bert_dir):
    """A request whose inputs take three forward passes (one input per pass here) reports the three passes'
    compute time, not the longest one's."""
    cfg = test_config(tiny_bert_dir, grpc_port=-1, max_batch_size=1, warmup=False)
    with LiveServer(cfg) as server, inject_latency(server, 0.2):
        r = httpx.post(server.http_url + "/v1/score", json={"inputs": [PAIR, RAW, PAIR]}, timeout=60)
    assert r.status_code == 200 and float(r.headers["X-Compute-Time-Ms"]) >= 3 * 200


async def test_client_gone_is_dropped_before_compute(limited_server):
    url = limited_server.http_url
    while limited_server.engine.batcher.depth:  # earlier tests' abandoned work finishes first
        await asyncio.sleep(0.05)
    before = metric_value(httpx.get(url + "/metrics").text, "rewardserve_dropped_inputs_total", reason="cancelled")
    with inject_latency(limited_server, 0.4):
        async with httpx.AsyncClient(base_url=url) as client:
            blocker = asyncio.ensure_future(client.post("/v1/score", json={"inputs": [PAIR] * 4}, timeout=10))
            await asyncio.sleep(0.1)
            with pytest.raises(httpx.ReadTimeout):  # this client gives up while its inputs are queued
                await client.post("/v1/score", json={"inputs": [RAW] * 3}, timeout=0.1)
            assert (await blocker).status_code == 200
    await asyncio.sleep(0.5)
    after = metric_value(httpx.get(url + "/metrics").text, "rewardserve_dropped_inputs_total", reason="cancelled")
    assert after - before == 3


async def test_concurrent_clients_coalesce(bert_server):
    url = bert_server.http_url
    before = httpx.get(url + "/metrics").text
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        with inject_latency(bert_server, 0.02):
            responses = await asyncio.gather(*(
                client.post("/v1/score", json={"inputs": [{"prompt": f"q{i}", "response": "same length answer"}]})
                for i in range(32)
            ))
    assert all(r.status_code == 200 for r in responses)
    after = httpx.get(url + "/metrics").text
    batches = (metric_value(after, "rewardserve_batch_size_count", model="tiny-bert")
               - metric_value(before, "rewardserve_batch_size_count", model="tiny-bert"))
    inputs = (metric_value(after, "rewardserve_batch_size_sum", model="tiny-bert")
              - metric_value(before, "rewardserve_batch_size_sum", model="tiny-bert"))
    assert inputs == 32
    assert batches <= 16, f"32 concurrent requests ran in {batches} forward passes"
