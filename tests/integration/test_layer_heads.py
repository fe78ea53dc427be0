"""Heads that read an earlier decoder layer than the last (`head_layers` in a multi-head overlay): one forward pass
serves heads over several layers; a head reading layer k scores what the same row scores over a base cut to its
first k layers (`num_hidden_layers: k`), on every forward (transformers padded, packed, prefix tree; the invariant
forward bit for bit); bad metadata is refused at load; the server serves such heads by name beside other heads."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from rewardmodel.modeling import OVERLAY_META, load_reward_model, resolve_model, reward_forward
from service.backends import packing
from service.backends.hf_backend import HFBackend
from service.config import ServeConfig
from service.grouping import Group, PlannedBatch
from tests.helpers import LiveServer, make_head_overlay, test_config

SEQS = [list(range(5, 31)), list(range(40, 47)), list(range(5, 21)), [9, 8, 7]]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("layer-heads")
    rows = torch.randn(3, 32, generator=torch.Generator().manual_seed(11))
    return {
        # heads in the order layer 2, layer 1, layer 1: rows of one layer need not be next to each other
        "lay": make_head_overlay(root / "lay", tiny_llama_dir, rows, heads=["top", "low", "low2"],
                                 head_layers=[2, 1, 1]),
        "cut": make_head_overlay(root / "cut", tiny_llama_dir, rows[1:2], num_layers=1),
        "cut2": make_head_overlay(root / "cut2", tiny_llama_dir, rows[2:3], num_layers=1),
        "full": make_head_overlay(root / "full", tiny_llama_dir, rows[:1]),
        "low-at-last": make_head_overlay(root / "low-at-last", tiny_llama_dir, rows[1:2]),
        "rows": rows,
    }


def _model(path):
    return load_reward_model(resolve_model(str(path)), torch.float32, "cpu")


def test_transformers_forwards_read_each_heads_layer(zoo):
    lay, cut, cut2, full = (_model(zoo[k]) for k in ("lay", "cut", "cut2", "full"))
    ids = torch.tensor([s[:7] for s in SEQS[:3]])
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0  # a right-padded row
    with torch.no_grad():
        got = reward_forward(lay, ids, mask, heads=True)  # (3, heads)
        want = torch.stack([reward_forward(m, ids, mask) for m in (full, cut, cut2)], 1)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(got[:, 1], reward_forward(_model(zoo["low-at-last"]), ids, mask), atol=1e-2)
        for batch in (SEQS, PlannedBatch(SEQS[:3] + [SEQS[0][:20] + [3, 4]], (Group(20, (0, 3)),), 8)):
            packed = packing.packed_head_outputs(lay, "decoder", batch)  # packed, then the prefix tree
            ref = torch.stack([packing.packed_head_outputs(m, "decoder", batch)[:, 0] for m in (full, cut, cut2)], 1)
            torch.testing.assert_close(packed, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_invariant_forward_matches_the_cut_model_bit_for_bit(zoo, dtype):
    lay = HFBackend(test_config(zoo["lay"], dtype=dtype))
    cut = HFBackend(test_config(zoo["cut"], dtype=dtype))
    full = HFBackend(test_config(zoo["full"], dtype=dtype))
    assert lay.invariant is not None and sorted(lay.invariant.taps) == [1] and lay.invariance_checked is None
    batch = PlannedBatch(SEQS)
    got = [o[-1] for o in lay.outputs(batch)]  # (heads,) per input
    assert [float(g[1]) for g in got] == [float(o[-1, 0]) for o in cut.outputs(batch)]
    assert [float(g[0]) for g in got] == [float(o[-1, 0]) for o in full.outputs(batch)]
    assert [float(g[1]) for g in got] != [float(g[2]) for g in got]  # the two layer-1 rows are two heads
    alone = [lay.outputs(PlannedBatch([s]))[0][-1] for s in SEQS]
    assert all((a == g).all() for a, g in zip(alone, got))


@pytest.mark.parametrize("meta, needle", [
    ({"head_layers": [1, 2]}, "one layer count"),  # three heads, two entries
    ({"head_layers": [0, 1, 2]}, "one layer count"),
    ({"head_layers": [1, 2, True]}, "one layer count"),
    ({"head_layers": [1, 2, 3]}, "reads layer 3, but the backbone loads 2 decoder layer"),
    ({"head_layers": [1, 2, 2], "num_hidden_layers": 1}, "reads layer 2, but the backbone loads 1 decoder layer"),
])
def test_bad_head_layers_are_refused_at_load(tmp_path, tiny_llama_dir, meta, needle):
    out = make_head_overlay(tmp_path / "bad", tiny_llama_dir, torch.zeros(3, 32), heads=["a", "b", "c"])
    body = json.loads((out / OVERLAY_META).read_text()) | meta
    (out / OVERLAY_META).write_text(json.dumps(body))
    with pytest.raises(ValueError, match=needle):
        load_reward_model(resolve_model(str(out)), torch.float32, "cpu")


def test_served_by_name_beside_heads_of_the_last_layer(zoo):
    cfg = ServeConfig(models=[{"name": "lay", "path": str(zoo["lay"])}, {"name": "full", "path": str(zoo["full"])},
                              {"name": "cut", "path": str(zoo["cut"])}],
                      port=0, grpc_port=-1, log_level="warning", dtype="float32")
    inputs = [{"prompt": "What is 2 + 2?", "response": r} for r in ("4.", "Five, I believe.", "It is four.")]
    with LiveServer(cfg) as live:
        house = live.runtime.house
        assert house.resolve("lay/low").engine is house.resolve("full").engine  # one pass for both layers
        assert house.resolve("cut").engine is not house.resolve("full").engine

        def rewards(name):
            r = httpx.post(live.http_url + "/v1/score", json={"model": name, "inputs": inputs}, timeout=60)
            assert r.status_code == 200, r.text
            return [s["reward"] for s in r.json()["scores"]]

        assert rewards("lay/low") == rewards("cut")  # layer 1 inside a shared pass == a model cut to layer 1
        assert rewards("lay/top") == rewards("full")
        members = [s["members"] for s in httpx.post(live.http_url + "/v1/score", json={
            "model": "lay", "inputs": inputs}, timeout=60).json()["scores"]]
        assert [m["lay/low"] for m in members] == rewards("lay/low")
