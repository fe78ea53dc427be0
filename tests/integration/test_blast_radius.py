"""Nothing one request carries can fail another client's request.

Valid traffic is hammered from many clients while other clients send every kind of bad input (an empty raw text,
lone surrogates, token ids outside the vocabulary, an input on which the model itself fails): every valid request gets its scores, every bad one a typed 4xx (or, for the input the model
fails on, a typed 500 for that request alone).
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.helpers import LiveServer, test_config

VALID = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(6)]
POISON = "zzpoisonzz"  # the fault injected below makes the model fail on any input holding this text's tokens


@pytest.fixture(scope="module")
def server(tiny_llama_dir):
    with LiveServer(test_config(tiny_llama_dir, model_name="tiny-llama", max_wait_ms=20)) as live:
        yield live


def raw_json(body: dict) -> bytes:
    """JSON with lone surrogates escaped as \\udXXX (a client can send them; httpx's json= could not)."""
    return json.dumps(body, ensure_ascii=True).encode()


def bad_requests(server) -> list[tuple[str, bytes, int, str]]:
    """(route, body, status, a word the message holds)."""
    return [
        ("/v1/score", raw_json({"inputs": [{"raw": ""}]}), 400, "inputs.0"),
        ("/get_reward", raw_json({"query": [""]}), 400, "query.0"),
        ("/v1/score", raw_json({"inputs": [{"prompt": "a\ud800b", "response": "x"}]}), 422, "surrogate"),
        ("/get_reward", raw_json({"query": ["\udfff"]}), 422, "surrogate"),
        ("/v1/rerank", raw_json({"prompt": "q", "candidates": ["ok", "\ud800"]}), 422, "surrogate"),
        ("/classify", raw_json({"input": "\ud800"}), 400, "surrogate"),
        ("/classify", raw_json({"input": [[10**9]]}), 400, "vocabulary"),
        ("/v1/score", raw_json({"inputs": [VALID[0], {"raw": ""}]}), 400, "inputs.1"),
    ]


def inject_poison(server) -> None:
    """Fault injection: the model fails (raises) on any pass that holds the poison tokens."""
    batcher, tokenizer = server.engine.batcher, server.engine.tokenizer
    original = batcher._compute

    def compute(batch):
        if any(POISON in tokenizer.decode(list(ids)) for ids in batch):
            raise RuntimeError("the model failed on this input")
        return original(batch)

    batcher._compute = compute


async def _hammer(server, clients: int = 8, rounds: int = 6) -> tuple[list, list]:
    async with httpx.AsyncClient(base_url=server.http_url, timeout=60) as client:
        async def good(k: int) -> list[httpx.Response]:
            out = []
            for r in range(rounds):
                out.append(await client.post("/v1/score", json={"inputs": VALID[(k + r) % 3:(k + r) % 3 + 3]}))
            return out

        async def bad() -> list[tuple[httpx.Response, int, str]]:
            out = []
            for _ in range(rounds):
                for route, body, status, word in bad_requests(server):
                    response = await client.post(route, content=body, headers={"content-type": "application/json"})
                    out.append((response, status, word))
                poisoned = await client.post("/v1/score", json={"inputs": [{"raw": f"please {POISON} now"}]})
                out.append((poisoned, 500, "scoring failed"))
            return out

        results = await asyncio.gather(*(good(k) for k in range(clients)), bad(), bad())
    goods = [r for batch in results[:clients] for r in batch]
    bads = [item for batch in results[clients:] for item in batch]
    return goods, bads


def test_bad_inputs_never_fail_other_clients(server):
    reference = httpx.post(server.http_url + "/v1/score", json={"inputs": VALID}, timeout=60).json()["scores"]
    inject_poison(server)
    goods, bads = asyncio.run(_hammer(server))
    for response in goods:
        assert response.status_code == 200, response.text
        for score in response.json()["scores"]:
            assert min(abs(score["reward"] - s["reward"]) for s in reference) <= 1e-5
    for response, status, word in bads:
        body = response.json()
        assert response.status_code == status, (response.status_code, response.text)
        assert body["error"]["code"] == response.status_code and word in body["error"]["message"], response.text
    assert server.engine.batcher.depth == 0  # nothing left behind


def test_what_an_empty_input_gets(server, tiny_bert_dir):
    """Decided and documented (docs/api.md): an input that renders to no token at all is a 400 naming it; an
    empty response is still scored when the RM's template makes the input non-empty, as a chat template does."""
    r = httpx.post(server.http_url + "/v1/score", json={"inputs": [{"prompt": "", "response": ""}]}, timeout=30)
    assert r.status_code == 200 and r.json()["scores"][0]["tokens"] > 0
    r = httpx.post(server.http_url + "/v1/score", json={"inputs": [VALID[0], {"raw": ""}]}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("inputs.1: ")
    with LiveServer(test_config(tiny_bert_dir, model_name="tiny-bert")) as bert:  # BERT adds [CLS] [SEP]
        r = httpx.post(bert.http_url + "/v1/score", json={"inputs": [{"raw": ""}]}, timeout=30)
        assert r.status_code == 200 and r.json()["scores"][0]["tokens"] == 2
