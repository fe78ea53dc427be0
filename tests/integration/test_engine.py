"""RewardEngine on real tiny models: batch invariance, order, encoder and decoder heads."""

import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from service.engine import RewardEngine
from service.errors import ErrorKind, RewardServeError
from tests.helpers import test_config


def _inputs(seed: int, n: int) -> list[dict]:
    rng = random.Random(seed)
    words = "the a reward model scores answers to questions about cats rivers code and math".split()

    def text(k):
        return " ".join(rng.choice(words) for _ in range(k))

    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out.append({"prompt": text(rng.randint(1, 40)), "response": text(rng.randint(1, 200))})
        elif kind == 1:
            out.append({"messages": [
                {"role": "user", "content": text(rng.randint(1, 30))},
                {"role": "assistant", "content": text(rng.randint(1, 60))},
                {"role": "user", "content": text(rng.randint(1, 30))},
                {"role": "assistant", "content": text(rng.randint(1, 300))},
            ]})
        else:
            out.append({"raw": text(rng.randint(1, 500))})
    return out


@pytest.fixture(params=[("bert", "on"), ("bert", "off"), ("llama", "on"), ("llama", "off")], ids=str)
async def engine(request, tiny_bert_dir, tiny_llama_dir):
    which, packing = request.param
    model_dir = tiny_bert_dir if which == "bert" else tiny_llama_dir
    eng = RewardEngine.from_config(
        test_config(model_dir, max_batch_size=16, max_padding_ratio=0.9, packing=packing)
    )
    assert eng.batcher.packed == (packing == "on")
    await eng.start()
    yield eng
    await eng.stop()


async def test_batch_invariance_fp32(engine):
    """The same input gets the same reward (within 1e-5) alone or in any batch."""
    inputs = _inputs(0, 24)
    alone = [(await engine.score([x])).results[0].reward for x in inputs]
    together = [r.reward for r in (await engine.score(inputs)).results]
    shuffled_idx = list(range(len(inputs)))
    random.Random(1).shuffle(shuffled_idx)
    shuffled = (await engine.score([inputs[i] for i in shuffled_idx])).results
    for pos, i in enumerate(shuffled_idx):
        assert shuffled[pos].reward == pytest.approx(alone[i], abs=1e-5)
    assert together == pytest.approx(alone, abs=1e-5)
    assert len(set(round(r, 4) for r in alone)) > len(alone) // 2  # the model tells inputs apart


async def test_matches_plain_transformers(engine):
    """Rewards are the raw logit that transformers' own forward gives for the same token ids."""
    inputs = _inputs(2, 6)
    model_dir = engine.backend.source.path
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    from rewardmodel.rendering import encode_input

    got = [r.reward for r in (await engine.score(inputs)).results]
    for inp, reward in zip(inputs, got):
        ids = encode_input(tok, inp, engine.max_length).input_ids
        with torch.inference_mode():
            expected = model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        assert reward == pytest.approx(expected, abs=1e-5)


async def test_engine_rejects_bad_calls(engine):
    for call, kind in [
        (engine.score([]), ErrorKind.INVALID_ARGUMENT),
        (engine.score([{"raw": "x"}], model="nope"), ErrorKind.NOT_FOUND),
        (engine.score([{"raw": "x"}], normalize=True), ErrorKind.INVALID_ARGUMENT),
    ]:
        with pytest.raises(RewardServeError) as err:
            await call
        assert err.value.kind == kind


async def test_nonfinite_reward_is_an_error_not_a_number(tiny_bert_dir):
    eng = RewardEngine.from_config(test_config(tiny_bert_dir, warmup=False))
    eng.batcher._compute = lambda batch: [float("nan")] * len(batch)
    await eng.start()
    try:
        with pytest.raises(RewardServeError) as err:
            await eng.score([{"raw": "x"}])
        assert err.value.kind == ErrorKind.BACKEND and "non-finite" in err.value.message
    finally:
        await eng.stop()


async def test_a_departed_callers_tokenization_stops_at_its_next_input(tiny_bert_dir):
    """Latency injection: the encoder holds its first input until released. The caller goes away meanwhile: the
    tokenizer thread (one, shared by every request) stops before the next input instead of tokenizing the rest
    for nobody while other requests wait behind it."""
    import asyncio
    import threading

    eng = RewardEngine.from_config(test_config(tiny_bert_dir, warmup=False))
    await eng.start()
    try:
        entered, release, encoded = threading.Event(), threading.Event(), []

        def encoder(inp):
            entered.set()
            release.wait(10)
            encoded.append(inp)
            return eng.default_encoder(inp)

        inputs = [{"raw": "word " * 1000 + str(i)} for i in range(50)]  # long: tokenized on the thread
        task = asyncio.ensure_future(eng.encode(inputs, encoder))
        assert await asyncio.to_thread(entered.wait, 10)
        task.cancel()
        await asyncio.sleep(0)
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.get_running_loop().run_in_executor(eng._tokenize_pool, lambda: None)  # the thread is free
        assert len(encoded) == 1
        assert len(await eng.encode(inputs[:2])) == 2  # and serves the next caller
    finally:
        await eng.stop()
