"""Nothing one request carries can fail another client's request.

Valid traffic is hammered from many clients while other clients send every kind of bad input (an empty raw text,
lone surrogates, token ids outside the vocabulary, an input on which the model itself fails): every valid request gets its scores, every bad one a typed 4xx (or, for the input the model
fails on, a typed 500 for that request alone).
"""

from __future__ import annotations

import asyncio
import json
import time

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


def nan_model(tiny_llama_dir, out) -> tuple[str, str]:
    """The tiny llama with NaN embedding rows for one word's tokens: the model itself turns any input holding it
    into NaN (no fault injected in the server). Returns the model folder and the word."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    shutil.copytree(tiny_llama_dir, out)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)(" zebra", add_special_tokens=False).input_ids
    with torch.no_grad():
        model.model.embed_tokens.weight[ids] = float("nan")
    model.save_pretrained(out)
    return str(out), " zebra"


@pytest.mark.parametrize("forward", ["invariant", "transformers"])
def test_an_input_the_model_turns_to_nan_fails_alone(tiny_llama_dir, tmp_path, forward):
    """A NaN in one input's keys and values must not reach the inputs sharing its pass (a masked attention slot
    has weight zero, and zero times NaN is NaN): they get their own bits; the NaN input a 500 naming it."""
    from tests.helpers import gated_worker

    model_dir, word = nan_model(tiny_llama_dir, tmp_path / "nan")
    clean = [{"raw": f"clean {i}"} for i in range(5)]
    dirty = {"raw": f"a{word}"}
    with LiveServer(test_config(model_dir, model_name="nan", forward=forward, max_wait_ms=50)) as live:
        url = live.http_url + "/v1/score"
        alone = [httpx.post(url, json={"inputs": [c]}, timeout=60).json()["scores"][0]["reward"] for c in clean]

        async def together() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=60) as client:
                calls = [client.post(url, json={"inputs": [c]}) for c in clean[:2]]
                calls.append(client.post(url, json={"inputs": [dirty]}))
                calls += [client.post(url, json={"inputs": [c]}) for c in clean[2:]]
                calls.append(client.post(url, json={"inputs": [clean[0], dirty, clean[1]]}))
                return await asyncio.gather(*calls)

        with gated_worker(live) as (entered, gate):
            first = asyncio.run_coroutine_threadsafe(live.runtime.house.score([clean[0]]), live.loop)
            assert entered.wait(10)  # the worker is held: everything below queues up into shared passes
            pending = asyncio.run_coroutine_threadsafe(together(), live.loop)
            time.sleep(0.5)
            gate.set()
            first.result(timeout=60)
            replies = pending.result(timeout=120)
        singles = [r for i, r in enumerate(replies) if i != 2 and i != len(replies) - 1]
        assert [r.status_code for r in singles] == [200] * 5
        got = [r.json()["scores"][0]["reward"] for r in singles]
        if forward == "invariant":
            assert got == alone  # bitwise, NaN beside them or not
        else:  # transformers' packed forward is batch-dependent in the last bits
            assert got == pytest.approx(alone, abs=1e-5)
        for reply, index in ((replies[2], 0), (replies[-1], 1)):
            assert reply.status_code == 500 and reply.json()["error"]["type"] == "backend_error"
            assert reply.json()["error"]["message"].startswith(f"inputs.{index}: the model produced a non-finite")
