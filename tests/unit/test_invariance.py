"""Batch invariance, as a property: an input's reward is bit-identical (`==`, not a tolerance) whatever else shares
its forward pass: alone, packed with random others in random order, in shared-prefix trees of any nesting, in fp32,
bf16, int8x3 and int8x5, for a decoder and an encoder reward model, and for a decoder head that reads an earlier
layer than the last (a multi-head overlay's `head_layers`)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.backends.hf_backend import HFBackend
from service.backends.invariant import int8_gemm_exact
from service.grouping import Group, PlannedBatch
from tests.helpers import test_config

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


PARAMS = [(kind, dtype, "off") for kind in ("llama", "bert") for dtype in ("float32", "bfloat16", "int8x3", "int8x5")]
PARAMS += [("llama", dtype, "on") for dtype in ("float32", "bfloat16", "int8x5")]  # fused by torch.compile
PARAMS += [("llama-layers", "float32", "off"), ("llama-layers", "bfloat16", "off"), ("llama-layers", "bfloat16", "on")]


@pytest.fixture(scope="module")
def layered_overlay(tmp_path_factory, tiny_llama_dir):
    """Two heads over the tiny 2-layer Llama: the first (the one `rewards` reads) reads layer 1, the second layer 2."""
    from tests.helpers import make_head_overlay

    rows = torch.randn(2, 32, generator=torch.Generator().manual_seed(3))
    return make_head_overlay(tmp_path_factory.mktemp("layers") / "lay", tiny_llama_dir, rows, heads=["L1", "L2"],
                             head_layers=[1, 2])


@pytest.fixture(scope="module", params=PARAMS, ids=lambda p: "-".join(p[:2]) + ("-compiled" if p[2] == "on" else ""))
def backend(request, tiny_llama_dir, tiny_bert_dir):
    kind, dtype, compile = request.param
    if kind == "llama-layers":
        tiny_llama_dir = request.getfixturevalue("layered_overlay")
    if dtype.startswith("int8") and not int8_gemm_exact("cpu"):
        pytest.skip("this machine's int8 GEMM is not exact: int8x3/int8x5 are refused here (test_int8_gemms.py)")
    if compile == "on":
        from service.backends.fused import compiler_missing

        if compiler_missing("cpu"):
            pytest.skip(f"torch.compile cannot build kernels here: {compiler_missing('cpu')}")
    model_dir = tiny_llama_dir if kind.startswith("llama") else tiny_bert_dir
    backend = HFBackend(test_config(model_dir, dtype=dtype, compile=compile))
    assert backend.invariant is not None
    assert backend.describe()["compiled"] is (compile == "on")
    if kind == "llama-layers":
        assert list(backend.invariant.taps) == [1]  # the first head reads the first layer: a tap, not the last
    return backend


def tokens(backend, draw_ids: list[int]) -> list[int]:
    vocab = backend.invariant.embed.shape[0] if hasattr(backend.invariant, "embed") else backend.invariant.word.shape[0]
    return [3 + i % (vocab - 3) for i in draw_ids]


SEQ = st.lists(st.integers(min_value=0, max_value=10**6), min_size=1, max_size=150)


@SETTINGS
@given(target=SEQ, others=st.lists(SEQ, max_size=6), position=st.integers(0, 6), share=st.sampled_from([0, 1, 16]))
def test_packed_with_anything_in_any_order(backend, target, others, position, share):
    target = tokens(backend, target)
    others = [tokens(backend, o) for o in others]
    alone = backend.rewards(PlannedBatch([target]))[0]
    batch = list(others)
    batch.insert(min(position, len(batch)), target)
    share = share if backend.head == "decoder" else 0  # encoders attend both ways: never grouped
    got = backend.rewards(PlannedBatch(batch, min_shared=share))
    assert got[batch.index(target)] == alone


@SETTINGS
@given(prefix=st.lists(st.integers(0, 10**6), min_size=1, max_size=140),
       suffixes=st.lists(st.lists(st.integers(0, 10**6), max_size=40), min_size=1, max_size=6),
       nested=st.lists(st.integers(0, 10**6), max_size=30), min_shared=st.sampled_from([1, 4, 16, 64]))
def test_shared_prefix_trees_change_no_bit(backend, prefix, suffixes, nested, min_shared):
    if backend.head != "decoder":
        pytest.skip("encoders are never grouped")
    prefix, nested = tokens(backend, prefix), tokens(backend, nested)
    members = [prefix + tokens(backend, s) for s in suffixes] + [prefix + nested + tokens(backend, s) for s in suffixes]
    alone = [backend.rewards(PlannedBatch([m]))[0] for m in members]
    groups = (Group(len(prefix), tuple(range(len(members)))),)
    grouped = backend.rewards(PlannedBatch(members, groups, min_shared))
    assert grouped == alone


def test_bf16_is_not_fp32(tiny_llama_dir):
    """The two precisions really differ (a test of the test: bf16 computes in bf16)."""
    seq = list(range(5, 60))
    fp32 = HFBackend(test_config(tiny_llama_dir, dtype="float32")).rewards(PlannedBatch([seq]))[0]
    bf16 = HFBackend(test_config(tiny_llama_dir, dtype="bfloat16")).rewards(PlannedBatch([seq]))[0]
    assert fp32 != bf16 and abs(fp32 - bf16) < 0.05 * max(1.0, abs(fp32))


def test_the_self_check_passes_on_this_machine(backend):
    backend.warmup()
    assert backend.invariance_checked is True
    assert backend.describe()["batch_invariant"] is True


def test_auto_precision_follows_the_hardware(tiny_llama_dir):
    from service.backends.precision import native_bf16

    backend = HFBackend(test_config(tiny_llama_dir, dtype="auto"))
    assert backend.dtype == (torch.bfloat16 if native_bf16("cpu") else torch.float32)
    assert backend.describe()["machine"]["cpu_capability"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_no_gemm_call_is_bigger_than_the_probe_checked(dtype, monkeypatch):
    """A pass longer than CALL_TILES tiles is cut into calls the probe verified: every row gets the bits of its
    tile computed alone (on an AMX Xeon, one bf16 call over ~2,300 rows did not)."""
    import torch.nn.functional as F

    from service.backends import invariant

    gen = torch.Generator().manual_seed(0)
    lin = invariant.RowLinear(torch.randn(96, 80, generator=gen), torch.randn(96, generator=gen), dtype)
    x = torch.randn(invariant.ROW_TILE * (2 * invariant.CALL_TILES + 5), 80, generator=gen)
    sizes = []
    real, real_addmm = F.linear, torch.addmm
    monkeypatch.setattr(invariant.F, "linear", lambda a, *rest: sizes.append(a.shape[0]) or real(a, *rest))
    monkeypatch.setattr(invariant.torch, "addmm",  # the in-place calls of a long pass (linear_calls)
                        lambda b, a, *rest, **kw: sizes.append(a.shape[0]) or real_addmm(b, a, *rest, **kw))
    got = lin(x)
    assert max(sizes) <= invariant.CALL_TILES * invariant.ROW_TILE and sum(sizes) == x.shape[0]
    per_tile = torch.cat([real(t.to(dtype), lin.weight, lin.bias) for t in x.split(invariant.ROW_TILE)])
    assert torch.equal(got, per_tile)
