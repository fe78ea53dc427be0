"""Many reward models in one server: named models, score heads sharing one backbone, ensembles with rules,
served length debiasing, GRPO groups; every route by name, members bit-identical to themselves alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import time
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from protos import reward_pb2, reward_pb2_grpc
from rewardmodel.modeling import OVERLAY_META, OVERLAY_TENSORS, sha256_file
from service.config import ServeConfig
from tests.helpers import LiveServer, metric_value

PAIRS = [
    {"prompt": "What is 2 + 2?", "response": "It is 4.", "reference": "4"},
    {"prompt": "What is 2 + 2?", "response": "I think the answer is 5, or maybe more than that.", "reference": "4"},
    {"prompt": "Name a colour.", "response": "Blue.", "reference": "blue"},
    {"prompt": "Name a colour.", "response": "Red, like a ripe tomato in the summer sun.", "reference": "red"},
]


def overlay(out: Path, base: Path, rows: torch.Tensor, heads: list[str] | None = None,
            stats: dict | None = None) -> Path:
    out.mkdir(parents=True)
    meta = {"base": str(Path("..") / base.name), "base_sha256": sha256_file(base / "model.safetensors"),
            "max_length": 256}
    if heads:
        meta["heads"] = heads
    (out / OVERLAY_META).write_text(json.dumps(meta))
    save_file({"score.weight": rows.contiguous()}, str(out / OVERLAY_TENSORS))
    if stats:
        (out / "reward_stats.json").write_text(json.dumps(stats))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_llama_dir, tiny_bert_dir):
    root = tmp_path_factory.mktemp("zoo")
    base = root / "base"
    shutil.copytree(tiny_llama_dir, base)
    gen = torch.Generator().manual_seed(7)
    hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    rows = torch.randn(6, hidden, generator=gen) * 0.5
    length = {"slope": -0.02, "mean_tokens": 9.0, "r_before": -0.3, "r_after": 0.0, "unit": "response_tokens",
              "fit_on": "test"}
    return {
        "harmless": overlay(root / "harmless", base, rows[:1], stats={"mean": 0.1, "std": 0.5, "length": length}),
        "helpful": overlay(root / "helpful", base, rows[1:2], stats={"mean": -0.2, "std": 2.0}),
        "trio": overlay(root / "trio", base, rows[2:5], heads=["a", "b", "c"],
                        stats={"heads": {h: {"mean": 0.0, "std": 1.0} for h in "abc"}}),
        "mini": tiny_bert_dir,
    }


def config(zoo: dict, **extra) -> ServeConfig:
    return ServeConfig(
        models=[{"name": "harmless", "path": str(zoo["harmless"]), "aliases": ["hh"]},
                {"name": "helpful", "path": str(zoo["helpful"])},
                {"name": "trio", "path": str(zoo["trio"])},
                {"name": "mini", "path": str(zoo["mini"])},
                {"name": "harmless-debiased", "path": str(zoo["harmless"]), "debias": "length"}],
        ensembles=[
            {"name": "safe", "combine": "mean_minus_std", "penalty": 0.5, "members": {"harmless": 1.0, "mini": 1.0},
             "rules": [{"kind": "length", "weight": -0.001}]},
            {"name": "both", "combine": "weighted", "members": {"harmless": 3.0, "helpful": 1.0}},
            {"name": "cautious", "combine": "min", "normalize": True, "members": {"harmless": 1.0, "helpful": 1.0},
             "rules": [{"kind": "answer", "weight": 1.0}]},
        ],
        port=0, grpc_port=0, log_level="warning", dtype="float32", **extra,
    )


@pytest.fixture(scope="module")
def server(zoo):
    with LiveServer(config(zoo)) as live:
        yield live


def score(server, model: str | None, inputs=PAIRS, **body) -> dict:
    r = httpx.post(server.http_url + "/v1/score", json={"model": model, "inputs": inputs, **body}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def rewards(server, model, inputs=PAIRS) -> list[float]:
    return [s["reward"] for s in score(server, model, inputs)["scores"]]


def test_every_model_is_listed_with_its_kind(server):
    listed = {m["id"]: m for m in httpx.get(server.http_url + "/v1/models").json()["data"]}
    assert list(listed)[0] == "harmless"  # the first is the default
    assert {k: listed[k]["kind"] for k in ("harmless", "trio", "trio/a", "mini", "safe")} == {
        "harmless": "model", "trio": "ensemble", "trio/a": "model", "mini": "model", "safe": "ensemble"}
    assert listed["safe"]["members"] == {"harmless": 1.0, "mini": 1.0} and "hh" in listed["harmless"]["aliases"]
    with grpc.insecure_channel(server.grpc_target) as channel:
        models = reward_pb2_grpc.RewardServiceStub(channel).ListModels(reward_pb2.ListModelsRequest(), timeout=30)
    assert [m.id for m in models.models] == list(listed) and models.models[0].dtype == "float32"
    # an ensemble says how its backbones compute: the llama overlays' invariant forward and the BERT one's
    assert listed["safe"]["dtype"] == "float32" and listed["safe"]["batch_invariant"] is True
    assert listed["safe"]["forward"] == "invariant" and listed["safe"]["compiled"] is False
    by_id = {m.id: m for m in models.models}
    assert by_id["safe"].dtype == "float32" and by_id["safe"].batch_invariant and not by_id["safe"].compiled


def test_a_model_answers_to_its_folder_among_several(zoo, monkeypatch):
    """Started by relative folders (as `--model name=folder`), each model answers to its folder's absolute path
    too (verl sends a model's path as its name); a folder served twice answers as its first entry."""
    monkeypatch.chdir(zoo["harmless"].parent)
    served = ServeConfig(models=[{"name": "a", "path": "harmless"}, {"name": "b", "path": "trio"},
                                 {"name": "a-debiased", "path": "harmless", "debias": "length"}],
                         port=0, grpc_port=-1, log_level="warning", dtype="float32")
    with LiveServer(served) as live:
        assert score(live, str(zoo["harmless"].resolve()))["model"] == "a"
        assert score(live, str(zoo["trio"].resolve()))["model"] == "b"
        assert score(live, "harmless")["model"] == "a"
        assert score(live, str(zoo["trio"].resolve()) + "/")["model"] == "b"  # with the slash a shell adds
        assert score(live, "harmless/")["model"] == "a"
        r = httpx.post(live.http_url + "/v1/score", json={"model": "/no/such/folder", "inputs": PAIRS}, timeout=60)
        assert r.status_code == 404


def test_heads_over_one_base_share_one_backbone(server):
    house = server.runtime.house
    assert len(house.engines) == 2  # the llama base (harmless, helpful, trio's three heads) and the BERT
    assert house.resolve("harmless").engine is house.resolve("trio/c").engine is house.resolve("helpful").engine


def test_members_equal_their_standalone_scores_bitwise(server, zoo):
    served = {name: rewards(server, name) for name in ("harmless", "helpful", "mini", "trio/b")}
    safe = score(server, "safe")["scores"]
    assert [s["members"] for s in safe] == [{"harmless": a, "mini": b}
                                           for a, b in zip(served["harmless"], served["mini"])]
    with LiveServer(ServeConfig(model=str(zoo["helpful"]), port=0, grpc_port=-1, log_level="warning",
                                dtype="float32")) as alone:
        assert rewards(alone, None) == served["helpful"]  # one head alone, in its own process: the same bits
    trio = score(server, "trio")["scores"]
    assert [s["members"]["trio/b"] for s in trio] == served["trio/b"]


def test_ensemble_arithmetic(server):
    h, m, helpful = rewards(server, "harmless"), rewards(server, "mini"), rewards(server, "helpful")
    tokens = [len(server.engine.tokenizer(p["response"], add_special_tokens=False)["input_ids"]) for p in PAIRS]
    for i, s in enumerate(score(server, "safe")["scores"]):
        values = np.array([h[i], m[i]])
        assert s["std"] == pytest.approx(values.std(), abs=1e-9)
        expected = values.mean() - 0.5 * values.std() - 0.001 * tokens[i]
        assert s["reward"] == pytest.approx(expected, abs=1e-9) and s["rules"] == {"length": float(tokens[i])}
    for i, s in enumerate(score(server, "both")["scores"]):
        assert s["reward"] == pytest.approx((3 * h[i] + helpful[i]) / 4, abs=1e-9)
    for i, s in enumerate(score(server, "cautious")["scores"]):
        normalized = [(h[i] - 0.1) / 0.5, (helpful[i] + 0.2) / 2.0]
        answer = 1.0 if i == 0 else 0.0  # "It is 4." ends with the reference number; the rest do not
        assert s["reward"] == pytest.approx(min(normalized) + answer, abs=1e-6), (i, s)


def test_a_gate_routes_each_input_to_its_members(server, zoo):
    """Llama-2-style routing: where the gate model's raw reward is above the threshold the gate's members answer
    (normalized, weighted mean), elsewhere the ensemble's own combine; declared in a config or in a multi-head
    overlay's `ensemble` block; every model read is reported raw, bit-identical to itself alone."""
    alone = {name: rewards(server, name) for name in ("harmless", "helpful", "trio/a", "trio/b")}
    threshold = float(np.median(alone["helpful"]))  # random rows: two inputs above, two below
    assert sum(v > threshold for v in alone["helpful"]) == 2
    root = Path(str(zoo["trio"])).parent
    quad = overlay(root / "quad", root / "base", torch.randn(4, 32, generator=torch.Generator().manual_seed(3)) * 0.5,
                   heads=["gate", "safe", "x", "y"],
                   stats={"heads": {"gate": {"mean": 0.0, "std": 1.0}, "safe": {"mean": 0.5, "std": 2.0},
                                    "x": {"mean": -1.0, "std": 0.5}, "y": {"mean": 0.0, "std": 1.0}}})
    meta = json.loads((quad / OVERLAY_META).read_text())
    block = {"combine": "mean", "normalize": True, "members": ["x", "y"],
             "gate": {"head": "gate", "threshold": 0.0, "members": ["safe"]}}
    (quad / OVERLAY_META).write_text(json.dumps({**meta, "ensemble": block}))
    cfg = config(zoo).model_dump()
    cfg["models"].append({"name": "quad", "path": str(quad)})
    cfg["ensembles"].append({"name": "routed", "combine": "mean", "normalize": True,
                             "members": {"trio/a": 1.0, "trio/b": 1.0},
                             "gate": {"model": "helpful", "threshold": threshold, "members": {"harmless": 1.0},
                                      "reads": "input"}})
    prompts = [{"messages": [{"role": "user", "content": p["prompt"]}, {"role": "assistant", "content": ""}]}
               for p in PAIRS]  # what a gate reading the prompt reads: the response emptied
    on_prompts = rewards(server, "helpful", prompts)
    assert on_prompts[0] == on_prompts[1] and on_prompts[2] == on_prompts[3] and on_prompts[0] != on_prompts[2]
    by_prompt = (on_prompts[0] + on_prompts[2]) / 2  # one prompt routed, the other not
    cfg["ensembles"].append({"name": "by-prompt", "combine": "mean", "members": {"trio/a": 1.0, "trio/b": 1.0},
                             "gate": {"model": "helpful", "threshold": by_prompt, "members": {"harmless": 1.0}}})
    mini_on_prompts = rewards(server, "mini", prompts)  # a gate on another backbone: its own submission
    cfg["ensembles"].append({"name": "by-mini", "members": {"trio/a": 1.0},
                             "gate": {"model": "mini", "threshold": 0.0, "members": {"harmless": 1.0}}})
    with LiveServer(ServeConfig(**cfg)) as live:
        listed = {m["id"]: m for m in httpx.get(live.http_url + "/v1/models").json()["data"]}
        assert listed["routed"]["gate"] == {"model": "helpful", "threshold": threshold, "reads": "input",
                                            "members": {"harmless": 1.0}}
        assert listed["quad"]["gate"] == {"model": "quad/gate", "threshold": 0.0, "reads": "input",
                                          "members": {"quad/safe": 1.0}}
        assert listed["by-prompt"]["gate"]["reads"] == "prompt"  # the default
        for i, s in enumerate(score(live, "by-prompt")["scores"]):  # both answers to a prompt take one side
            assert s["members"] == {"trio/a": alone["trio/a"][i], "trio/b": alone["trio/b"][i],
                                    "harmless": alone["harmless"][i], "helpful@prompt": on_prompts[i]}
            a, b = alone["trio/a"][i], alone["trio/b"][i]
            assert s["reward"] == (alone["harmless"][i] if on_prompts[i] > by_prompt else (a + b) / 2)
        for i, s in enumerate(score(live, "by-mini")["scores"]):
            assert s["members"] == {"trio/a": alone["trio/a"][i], "harmless": alone["harmless"][i],
                                    "mini@prompt": mini_on_prompts[i]}
            assert s["reward"] == (alone["harmless"][i] if mini_on_prompts[i] > 0.0 else alone["trio/a"][i])
        raw = httpx.post(live.http_url + "/v1/score", json={"model": "by-prompt", "inputs": [{"raw": "hi"}]})
        assert raw.status_code == 400 and "routes by the prompt" in raw.json()["error"]["message"]
        assert rewards(live, "helpful") == alone["helpful"]  # the prompt reads did not disturb anyone
        routed = score(live, "routed")["scores"]
        for i, s in enumerate(routed):
            assert s["members"] == {name: alone[name][i] for name in ("trio/a", "trio/b", "helpful", "harmless")}
            if alone["helpful"][i] > threshold:
                assert s["reward"] == pytest.approx((alone["harmless"][i] - 0.1) / 0.5, abs=1e-9) and s["std"] == 0
            else:
                values = np.array([alone["trio/a"][i], alone["trio/b"][i]])  # trio's stats: mean 0, std 1
                assert s["reward"] == pytest.approx(values.mean(), abs=1e-9)
                assert s["std"] == pytest.approx(values.std(), abs=1e-9)
        heads = {h: rewards(live, f"quad/{h}") for h in ("gate", "safe", "x", "y")}
        for i, s in enumerate(score(live, "quad")["scores"]):
            assert s["members"] == {f"quad/{h}": heads[h][i] for h in ("x", "y", "gate", "safe")}
            want = ((heads["safe"][i] - 0.5) / 2.0 if heads["gate"][i] > 0.0
                    else ((heads["x"][i] + 1.0) / 0.5 + heads["y"][i]) / 2)
            assert s["reward"] == pytest.approx(want, abs=1e-6)
        assert {heads["gate"][i] > 0 for i in range(4)} == {True, False}  # both sides exercised


def test_an_ensemble_request_cancelled_at_once_gives_back_its_queue_room(server):
    """Cancelled in the loop step that admitted it (its per-engine jobs not started yet): the room it took on
    both backbones' queues comes back (it stayed taken for good: false OVERLOADED, a drain that never ends)."""
    house = server.runtime.house
    engines = house.resolve("safe").engines()
    assert len(engines) == 2

    async def cancel_right_after_admission() -> None:
        task = asyncio.ensure_future(house.score(PAIRS, model="safe"))
        asyncio.get_running_loop().call_soon(task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    for _ in range(3):
        server.call(cancel_right_after_admission())
    waited = time.monotonic() + 30
    while any(e.batcher.depth for e in engines) and time.monotonic() < waited:
        time.sleep(0.05)
    assert [e.batcher.depth for e in engines] == [0, 0]


def test_length_debiasing_is_served_as_a_named_variant(server):
    raw = rewards(server, "harmless")
    tokens = [len(server.engine.tokenizer(p["response"], add_special_tokens=False)["input_ids"]) for p in PAIRS]
    debiased = rewards(server, "harmless-debiased")
    assert debiased == pytest.approx([r + 0.02 * (t - 9.0) for r, t in zip(raw, tokens)], abs=1e-6)
    r = httpx.post(server.http_url + "/v1/score", json={"model": "harmless-debiased", "inputs": [{"raw": "x y"}]})
    assert r.status_code == 400 and "inputs.0" in r.json()["error"]["message"]


def test_grpo_groups_get_advantages_equal_to_numpy(server):
    body = score(server, "harmless", groups=[[0, 1], [2, 3]])
    got = [s["reward"] for s in body["scores"]]
    for group in ([0, 1], [2, 3]):
        r = np.array([got[i] for i in group])
        for k, i in enumerate(group):
            assert body["scores"][i]["advantage"] == pytest.approx((r[k] - r.mean()) / (r.std(ddof=1) + 1e-4))
            assert body["scores"][i]["advantage_centered"] == pytest.approx(r[k] - r.mean())
    same = score(server, "harmless", inputs=[PAIRS[0], PAIRS[0], PAIRS[2]], groups=[[0, 1], [2]])["scores"]
    assert [s["advantage"] for s in same] == [0.0, 0.0, 0.0]  # an all-equal group: zero, no NaN
    with grpc.insecure_channel(server.grpc_target) as channel:
        stub = reward_pb2_grpc.RewardServiceStub(channel)
        inputs = [reward_pb2.ScoreInput(pair=reward_pb2.PromptResponse(prompt=p["prompt"], response=p["response"]))
                  for p in PAIRS]
        reply = stub.Score(reward_pb2.ScoreRequest(model="harmless", inputs=inputs, groups=[
            reward_pb2.Group(members=[0, 1]), reward_pb2.Group(members=[2, 3])]), timeout=60)
    assert [s.advantage for s in reply.scores] == pytest.approx([s["advantage"] for s in body["scores"]])


@pytest.mark.parametrize("body,status,needle", [
    ({"model": "nope", "inputs": PAIRS}, 404, "harmless"),
    ({"model": "cautious", "inputs": [{"prompt": "q", "response": "a"}]}, 400, "inputs.0.reference"),
    ({"model": "harmless", "inputs": PAIRS, "groups": [[0, 9]]}, 400, "groups.0"),
    ({"model": "harmless", "inputs": PAIRS, "groups": [[0, 1], [1, 2]]}, 400, "two groups"),
    ({"model": "safe", "inputs": PAIRS, "normalize": True}, 400, "normalize"),
    ({"model": "harmless", "inputs": [{"prompt": "q", "steps": ["a"]}]}, 400, "no step head"),
])
def test_bad_requests(server, body, status, needle):
    r = httpx.post(server.http_url + "/v1/score", json=body, timeout=30)
    assert r.status_code == status and needle in r.json()["error"]["message"], r.text


def test_every_route_takes_a_model(server):
    helpful = rewards(server, "helpful")
    texts = [f"Human: {p['prompt']} Assistant: {p['response']}" for p in PAIRS]
    got = httpx.post(server.http_url + "/get_reward?model=helpful", json={"query": texts}).json()["rewards"]
    assert got == rewards(server, "helpful", [{"raw": t} for t in texts])
    classify = httpx.post(server.http_url + "/classify", json={"model": "hh", "input": texts[0],
                                                               "use_activation": False}).json()
    assert classify["model"] == "harmless"
    refused = httpx.post(server.http_url + "/classify", json={"model": "safe", "input": "x"})
    assert refused.status_code == 400 and "reads several backbones" in refused.json()["error"]["message"]
    # a multi-head overlay under its own name (heads of one backbone, no rules): vLLM's routes score it too
    trio = httpx.post(server.http_url + "/classify", json={"model": "trio", "input": texts,
                                                           "use_activation": False}).json()
    assert [d["probs"][0] for d in trio["data"]] == rewards(server, "trio", [{"raw": t} for t in texts])
    pooled = httpx.post(server.http_url + "/pooling", json={"model": "trio", "input": texts[:1]}).json()
    assert pooled["data"][0]["data"][0] == pytest.approx(1 / (1 + np.exp(-trio["data"][0]["probs"][0])))
    ranked = httpx.post(server.http_url + "/v1/rerank", json={
        "model": "helpful", "prompt": PAIRS[0]["prompt"], "candidates": [PAIRS[0]["response"], PAIRS[1]["response"]],
    }).json()
    assert sorted(c["reward"] for c in ranked["candidates"]) == sorted(helpful[:2])
    ens = httpx.post(server.http_url + "/v1/rerank", json={"model": "safe", "prompt": "q", "candidates": ["a", "b"]})
    assert ens.status_code == 200 and set(ens.json()["candidates"][0]["members"]) == {"harmless", "mini"}


def test_per_model_metrics(server):
    rewards(server, "helpful")
    text = httpx.get(server.http_url + "/metrics").text
    assert metric_value(text, "rewardserve_inputs_total", model="helpful") >= len(PAIRS)
    assert metric_value(text, "rewardserve_inputs_total", model="safe") >= len(PAIRS)


def test_clients_and_adapters_name_a_model_and_read_members(server):
    from clients import GrpcRewardClient, RewardClient, make_trl_reward_func
    from clients.verl_reward import compute_score_batch
    from training.rewards import RemoteReward

    helpful = rewards(server, "helpful")
    with RewardClient(server.http_url, model="helpful") as client:
        assert client.score(PAIRS) == helpful
    with GrpcRewardClient(server.grpc_target) as client:
        full = client.score_full(PAIRS, model="safe")
        assert set(full[0].members) == {"harmless", "mini"} and full[0].std is not None
        assert {m.id: m.kind for m in client.models()}["safe"] == "ensemble"
    logged = {}
    trl = make_trl_reward_func(server.http_url, model="safe", name="rm")
    got = trl(prompts=[p["prompt"] for p in PAIRS], completions=[p["response"] for p in PAIRS],
              log_metric=lambda name, value: logged.__setitem__(name, value))
    assert got == [s["reward"] for s in score(server, "safe")["scores"]]
    assert {"rm/harmless", "rm/mini", "rm/std"} <= set(logged)
    infos = [{"prompt": p["prompt"]} for p in PAIRS]
    verl = compute_score_batch([None] * 4, [p["response"] for p in PAIRS], [None] * 4, infos, url=server.http_url,
                               model="safe", return_members=True)
    assert [v["score"] for v in verl] == got and all({"harmless", "mini", "std"} <= set(v) for v in verl)
    remote = RemoteReward(server.http_url, model="helpful")
    try:
        assert remote.score(PAIRS, step=0) == helpful
    finally:
        remote.close()


@pytest.mark.parametrize("block,needle", [
    ({"combine": "median", "members": ["a"]}, "combine"),  # was served as a mean, silently
    ({"members": ["a"], "gate": {"head": "b", "threshold": float("nan"), "members": ["a"]}}, "threshold"),
    ({"members": ["a"], "gate": {"head": "b", "members": ["a"], "reads": "response"}}, "reads"),
    ({"members": ["a"], "gate": {"head": "b", "members": ["zz"]}}, "names head 'zz'"),
])
def test_an_overlays_ensemble_block_is_checked_as_a_config_ensemble_is(block, needle):
    from rewardmodel.normalization import RewardStats
    from service.house import overlay_ensemble
    from service.models import ServedModel

    heads = [ServedModel(f"quad/{h}", None, j, RewardStats(0.0, 1.0)) for j, h in enumerate("ab")]
    with pytest.raises(ValueError, match=needle):
        overlay_ensemble("quad", heads, block, set())
    served = overlay_ensemble("quad", heads, {"members": ["a"], "gate": {"head": "b", "members": ["a"]}}, set())
    assert served.gate.reads == "input" and served.gate.threshold == 0.0 and served.combine == "mean"
