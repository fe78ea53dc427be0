"""Shared-prefix group scoring: grouped rewards equal independent ones (fp32, within 1e-5, the batch-invariance
contract; the issue allows 1e-4), on the model, through the batcher's planner, and through live servers."""

from __future__ import annotations

import asyncio
import random
import threading

import grpc
import httpx
import pytest
import torch

from protos import reward_pb2 as pb
from protos import reward_pb2_grpc
from service.backends import packing
from service.grouping import PlannedBatch, plan_grouped_batches
from rewardmodel.modeling import load_reward_model, resolve_model, reward_forward
from tests.helpers import gated_worker, metric_value

ATOL = 1e-5


class Item:
    def __init__(self, ids):
        self.ids = ids

    @property
    def length(self):
        return len(self.ids)


@pytest.fixture(scope="module")
def models(tiny_llama_dir):
    """(reference model with SDPA, the same weights with the packed attention)."""
    source = resolve_model(str(tiny_llama_dir))
    reference = load_reward_model(source, torch.float32, "cpu")
    packed = load_reward_model(source, torch.float32, "cpu")
    packed.set_attn_implementation(packing.register())
    return reference, packed


def independent(model, seqs):
    with torch.inference_mode():
        return torch.cat([
            reward_forward(model, torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)) for ids in seqs
        ])


def grouped(model, seqs, min_prefix=16, max_batch_size=64, max_batch_tokens=100_000):
    """Rewards of `seqs` planned as the batcher plans them; also the tokens the groups saved."""
    items = [Item(s) for s in seqs]
    out, saved = {}, 0
    with torch.inference_mode():
        for batch, groups in plan_grouped_batches(items, max_batch_size, max_batch_tokens, min_prefix):
            planned = PlannedBatch([it.ids for it in batch], groups, min_prefix)  # as the batcher does
            saved += planned.saved_tokens
            for item, r in zip(batch, packing.packed_reward_forward(model, "decoder", planned)):
                out[id(item)] = r
    return torch.stack([out[id(it)] for it in items]), saved


def _rand(rng, vocab, n):
    return [rng.randrange(5, vocab) for _ in range(n)]


def _case(name, rng, vocab):
    if name.startswith("group"):  # group<N>-prefix<P>: N members with suffixes of 1..64 tokens
        n, p = (int(x) for x in name[5:].split("-prefix"))
        prompt = _rand(rng, vocab, p)
        return [prompt + _rand(rng, vocab, rng.randint(1, 64)) for _ in range(n)]
    prompt = _rand(rng, vocab, 120)
    if name == "nested":  # members that are prefixes of each other, and one equal to the shared prefix
        long = prompt + _rand(rng, vocab, 40)
        return [long[: 120 + k] for k in (0, 1, 5, 17, 40)] + [prompt + _rand(rng, vocab, 3)]
    if name == "identical":
        a, b = prompt + _rand(rng, vocab, 9), prompt + _rand(rng, vocab, 30)
        return [a, a, b, a, prompt, prompt]
    if name == "mixed":  # two groups, ungrouped inputs, a short shared header, inputs shorter than min_prefix
        header = _rand(rng, vocab, 20)
        p1, p2 = header + _rand(rng, vocab, 200), header + _rand(rng, vocab, 50)
        seqs = [p1 + _rand(rng, vocab, rng.randint(1, 30)) for _ in range(5)]
        seqs += [p2 + _rand(rng, vocab, rng.randint(1, 30)) for _ in range(4)]
        seqs += [_rand(rng, vocab, rng.randint(1, 300)) for _ in range(5)] + [header[:7], header[:7] + [9]]
        rng.shuffle(seqs)
        return seqs
    if name == "two-level":  # a 24-token system header shared by all, 4 prompts, 3 answers each
        header = _rand(rng, vocab, 24)
        prompts = [header + _rand(rng, vocab, rng.randint(20, 120)) for _ in range(4)]
        seqs = [p + _rand(rng, vocab, rng.randint(1, 40)) for p in prompts for _ in range(3)]
        rng.shuffle(seqs)
        return seqs
    raise ValueError(name)


CASES = ["group2-prefix16", "group5-prefix100", "group16-prefix400", "group8-prefix700", "nested", "identical",
         "mixed", "two-level"]


@pytest.mark.parametrize("case", CASES)
def test_grouped_equals_independent(models, case):
    reference, packed = models
    seqs = _case(case, random.Random(case), reference.config.vocab_size)
    expected = independent(reference, seqs)
    got, saved = grouped(packed, seqs)
    assert saved > 0  # groups were really formed
    assert torch.allclose(got, expected, atol=ATOL), (got - expected).abs().max()


def test_sharing_nests_header_then_prompt(models):
    """One pass computes the common header once and each prompt once: the tokens saved are both levels'."""
    reference, packed = models
    rng = random.Random(5)
    vocab = reference.config.vocab_size
    header = _rand(rng, vocab, 24)
    prompts = [header + _rand(rng, vocab, 60) for _ in range(4)]
    seqs = [p + _rand(rng, vocab, 10 + i) for p in prompts for i in range(2)]
    got, saved = grouped(packed, seqs, min_prefix=16)
    assert saved == (len(seqs) - 1) * 24 + 4 * 60  # header: 7 copies saved; each prompt: 1 copy saved
    assert torch.allclose(got, independent(reference, seqs), atol=ATOL)
    _, saved_one_level = grouped(packed, seqs, min_prefix=32)  # the header alone is too short to share
    assert saved_one_level == 4 * (24 + 60)


def test_group_chunks_and_batch_neighbours_do_not_change_a_reward(models):
    """Batch invariance with groups: one input's reward alone, in a small group, in a big group split in
    chunks, and packed beside other groups and inputs, is the same."""
    reference, packed = models
    rng = random.Random(11)
    vocab = reference.config.vocab_size
    prompt = _rand(rng, vocab, 150)
    target = prompt + _rand(rng, vocab, 25)
    alone, _ = grouped(packed, [target])
    others = [prompt + _rand(rng, vocab, rng.randint(1, 50)) for _ in range(20)]
    noise = [_rand(rng, vocab, rng.randint(10, 200)) for _ in range(6)]
    for seqs, kwargs in (
        ([target, others[0]], {}),
        ([*others[:10], target], {}),
        ([*others, target, *noise], {"max_batch_size": 4}),  # chunks of 4, each carrying the prefix
        ([*others, target, *noise], {"max_batch_tokens": 400}),
    ):
        got, saved = grouped(packed, seqs, **kwargs)
        assert saved > 0
        assert abs(got[seqs.index(target)] - alone[0]) <= ATOL
    assert abs(alone[0] - independent(reference, [target])[0]) <= ATOL


def test_only_packed_decoder_backends_group(tiny_bert_dir, tiny_llama_dir):
    from service.backends.hf_backend import HFBackend
    from tests.helpers import test_config

    assert HFBackend(test_config(tiny_llama_dir)).prefix_groups is True
    assert HFBackend(test_config(tiny_llama_dir, packing="off")).prefix_groups is False
    assert HFBackend(test_config(tiny_bert_dir)).prefix_groups is False  # encoder: attention both ways


# ---- live servers ------------------------------------------------------------------------------------------
PROMPT = "Explain, step by step and with care, how a reward model scores a response to a prompt. " * 6
ANSWERS = [f"Answer {i}: " + "it reads the text and " * (i % 5 + 1) + "outputs one number." for i in range(8)]


def _score(url, inputs):
    r = httpx.post(url + "/v1/score", json={"inputs": inputs}, timeout=60)
    assert r.status_code == 200, r.text
    return [s["reward"] for s in r.json()["scores"]]


def _metrics(url):
    text = httpx.get(url + "/metrics", timeout=10).text
    return (metric_value(text, "rewardserve_grouped_inputs_total"),
            metric_value(text, "rewardserve_prefix_tokens_saved_total"))


def test_one_request_of_candidates_is_one_group(llama_server):
    url = llama_server.http_url
    inputs = [{"prompt": PROMPT, "response": a} for a in ANSWERS] + [{"raw": "something else entirely"}]
    alone = [_score(url, [inp])[0] for inp in inputs]  # one input per request: no group
    before = _metrics(url)
    together = _score(url, inputs)
    after = _metrics(url)
    assert together == pytest.approx(alone, abs=ATOL)
    assert after[0] - before[0] == len(ANSWERS)
    prompt_tokens = len(llama_server.engine.tokenizer(PROMPT)["input_ids"])
    assert after[1] - before[1] >= (len(ANSWERS) - 1) * prompt_tokens


def _wait_depth(server, depth):
    for _ in range(500):
        if server.engine.batcher.depth >= depth:
            return
        threading.Event().wait(0.01)
    raise AssertionError(f"queue depth {server.engine.batcher.depth} never reached {depth}")


def _grpo_inputs():
    prompts = [f"Question {k}: " + "what is the value of careful reasoning here? " * 8 for k in range(3)]
    return [{"prompt": p, "response": f"Completion {j} " + "because " * j} for p in prompts for j in range(5)]


def test_concurrent_grpo_requests_are_grouped_across_requests(llama_server):
    """One completion per request (as GRPO reward functions often send), all in flight at once."""
    url = llama_server.http_url
    inputs = _grpo_inputs()
    alone = [_score(url, [inp])[0] for inp in inputs]
    before = _metrics(url)
    with gated_worker(llama_server) as (entered, gate):
        blocker = threading.Thread(target=_score, args=(url, [{"raw": "hold the worker"}]))
        blocker.start()
        assert entered.wait(30)

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                async def one(inp):
                    r = await client.post(url + "/v1/score", json={"inputs": [inp]})
                    assert r.status_code == 200, r.text
                    return r.json()["scores"][0]["reward"]
                return await asyncio.gather(*(one(inp) for inp in inputs))

        result: list = []
        sender = threading.Thread(target=lambda: result.extend(asyncio.run(burst())))
        sender.start()
        _wait_depth(llama_server, len(inputs) + 1)
        gate.set()
        sender.join(60)
        blocker.join(60)
    assert result == pytest.approx(alone, abs=ATOL)
    assert _metrics(url)[0] - before[0] == len(inputs)  # 3 groups of 5, formed across 15 requests


def test_score_stream_messages_are_grouped(llama_server):
    inputs = _grpo_inputs()
    alone = [_score(llama_server.http_url, [inp])[0] for inp in inputs]
    before = _metrics(llama_server.http_url)
    requests = [pb.ScoreRequest(request_id=str(i), inputs=[pb.ScoreInput(pair=pb.PromptResponse(**inp))])
                for i, inp in enumerate(inputs)]
    with gated_worker(llama_server) as (entered, gate):
        blocker = threading.Thread(target=_score, args=(llama_server.http_url, [{"raw": "hold"}]))
        blocker.start()
        assert entered.wait(30)
        with grpc.insecure_channel(llama_server.grpc_target) as channel:
            stream = reward_pb2_grpc.RewardServiceStub(channel).ScoreStream(iter(requests), timeout=60)
            _wait_depth(llama_server, len(inputs) + 1)
            gate.set()
            answers = {r.request_id: r.scores[0].reward for r in stream}
        blocker.join(60)
    assert [answers[str(i)] for i in range(len(inputs))] == pytest.approx(alone, abs=ATOL)
    assert _metrics(llama_server.http_url)[0] - before[0] == len(inputs)


def test_encoder_rm_falls_back_to_plain_batches(bert_server):
    url = bert_server.http_url
    assert bert_server.engine.batcher.group_min_prefix == 0
    inputs = [{"prompt": PROMPT, "response": a} for a in ANSWERS]
    alone = [_score(url, [inp])[0] for inp in inputs]
    before = _metrics(url)
    assert _score(url, inputs) == pytest.approx(alone, abs=ATOL)
    assert _metrics(url) == before
