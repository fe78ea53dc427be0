"""A process reward model trained by `rewardserve train prm`, served: `step_rewards` equal the trainer's own step
scores, over HTTP and gRPC, from `steps` or a `step_separator`; vLLM's STEP pooling on /pooling; Best-of-N and
rerank aggregate step scores; bad step inputs are 400 naming the field."""

from __future__ import annotations

import json
import math

import grpc
import httpx
import pytest

from protos import reward_pb2, reward_pb2_grpc
from rewardserve.cli import main
from tests.helpers import LiveServer, test_config
from tests.integration.test_train_prm import BAD, GOOD, QUESTIONS, stepwise, train_args, training_time_scores
from training.prm_batch import load_stepwise


@pytest.fixture(scope="module")
def prm(tiny_llama_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("prm-data")
    for name, n, seed in (("train", 48, 0), ("eval", 16, 1)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stepwise(n, seed)))
    out = tmp_path_factory.mktemp("prm-served")
    assert main(train_args(tiny_llama_dir, data, out)) == 0
    return {"dir": out, "data": data, "base": tiny_llama_dir}


@pytest.fixture(scope="module")
def server(prm):
    with LiveServer(test_config(prm["dir"], model_name="prm")) as live:
        yield live


def post(server, path, body):
    r = httpx.post(server.http_url + path, json=body, timeout=60)
    return r


def test_served_step_rewards_equal_the_trainers(server, prm):
    examples = load_stepwise(str(prm["data"] / "eval.jsonl"))
    expected = training_time_scores(prm["base"], prm["dir"], examples)
    inputs = [{"prompt": ex.prompt, "steps": list(ex.steps)} for ex in examples]
    r = post(server, "/v1/score", {"inputs": inputs})
    assert r.status_code == 200, r.text
    for score, want in zip(r.json()["scores"], expected, strict=True):
        assert score["step_rewards"] == pytest.approx(want.tolist(), abs=1e-4)
        assert score["reward"] == score["step_rewards"][-1]
    listed = httpx.get(server.http_url + "/v1/models").json()["data"][0]
    assert listed["kind"] == "prm"


def test_steps_or_a_separator_alone_or_batched_same_bits(server):
    steps = GOOD[:2] + BAD[:1]
    by_steps = post(server, "/v1/score", {"inputs": [{"prompt": QUESTIONS[0], "steps": steps}]}).json()["scores"][0]
    by_separator = post(server, "/v1/score", {"inputs": [
        {"prompt": QUESTIONS[1], "steps": GOOD[:1]},
        {"prompt": QUESTIONS[0], "response": "\n".join(steps), "step_separator": "\n"},
        {"prompt": QUESTIONS[0], "response": "\n".join(steps)},  # the model's own separator ("\n")
    ]}).json()["scores"]
    assert by_separator[1]["step_rewards"] == by_steps["step_rewards"] == by_separator[2]["step_rewards"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        reply = reward_pb2_grpc.RewardServiceStub(channel).Score(reward_pb2.ScoreRequest(inputs=[
            reward_pb2.ScoreInput(steps=reward_pb2.Steps(prompt=QUESTIONS[0], steps=steps))]), timeout=60)
    assert list(reply.scores[0].step_rewards) == by_steps["step_rewards"]


@pytest.mark.parametrize("inp,needle", [
    ({"prompt": "q", "steps": ["fine", "   "]}, "steps.1 is empty"),
    ({"prompt": "q", "steps": ["a long step that goes on and on " * 12] * 4}, "more than the 96 this model reads"),
    ({"raw": "hello"}, "process reward model"),
])
def test_bad_step_inputs(server, inp, needle):
    r = post(server, "/v1/score", {"inputs": [inp]})
    assert r.status_code == 400 and needle in r.json()["error"]["message"] and "inputs.0" in r.text, r.text


def test_empty_steps_are_refused_by_the_schema(server):
    r = post(server, "/v1/score", {"inputs": [{"prompt": "q", "steps": []}]})
    assert r.status_code == 422 and "inputs.0.steps" in r.json()["error"]["message"]


def test_step_pooling_like_vllm(server):
    text = QUESTIONS[0] + "\n" + "\n".join(GOOD[:2] + BAD[:1]) + "\n"
    r = post(server, "/pooling", {"input": text})
    assert r.status_code == 200, r.text
    rows = r.json()["data"][0]["data"]
    assert len(rows) >= 3 and all(len(p) == 2 and abs(sum(p) - 1) < 1e-6 for p in rows)
    raw = post(server, "/pooling", {"input": text, "use_activation": False}).json()["data"][0]["data"]
    assert [1 / (1 + math.exp(-(g - b))) for b, g in raw] == pytest.approx([p[1] for p in rows], abs=1e-6)
    assert post(server, "/pooling", {"input": "no newline at all"}).status_code == 400


def test_rerank_aggregates_step_scores(server):
    candidates = ["\n".join(GOOD[:3]), "\n".join(GOOD[:2] + BAD[:1]), "\n".join(BAD[:2])]
    scored = post(server, "/v1/score", {"inputs": [{"prompt": QUESTIONS[0], "response": c} for c in candidates]})
    steps = [s["step_rewards"] for s in scored.json()["scores"]]
    for how, agg in (("min", min), ("last", lambda s: s[-1]), ("mean", lambda s: sum(s) / len(s)),
                     ("product", lambda s: sum(-math.log1p(math.exp(-x)) for x in s))):
        ranked = post(server, "/v1/rerank", {"prompt": QUESTIONS[0], "candidates": candidates, "aggregate": how})
        assert ranked.status_code == 200, ranked.text
        best = ranked.json()["candidates"]
        assert [c["reward"] for c in best] == pytest.approx(sorted((agg(s) for s in steps), reverse=True))
        assert best[0]["step_rewards"] == steps[best[0]["index"]]
