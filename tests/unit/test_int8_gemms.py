"""int8x3 / int8x5: every matmul from int8 GEMMs over operands split into int8 slices, summed exactly in int32.
What could go wrong and is checked here: the split's error bound, an all-zero row (attention's empty rows), a row's
bits depending on its company, accuracy no better than bf16 (or int8x5 no better than int8x3), a saturating int8
GEMM accepted, and the precision reaching a backend where it cannot run."""

from __future__ import annotations

import pytest
import torch

from service.backends import invariant
from service.backends.hf_backend import HFBackend
from service.grouping import PlannedBatch
from tests.helpers import test_config

EXACT = invariant.int8_gemm_exact("cpu")
needs_exact = pytest.mark.skipif(not EXACT, reason="int8 GEMMs are not exact on this machine (int8x* refused)")


def outlier_rows(rows: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen)
    x[:, 3] *= 40.0  # an outlier channel, as LLM activations have: the per-row scale must cope with it
    return x


@pytest.mark.parametrize("slices", [2, 3])
def test_split_reconstructs_within_its_bound(slices):
    x = outlier_rows(64, 96)
    x[5] = 0.0
    parts, scale = invariant.split_int8(x, slices)
    assert parts.dtype == torch.int8 and parts.shape == (64, 96 * slices)
    assert int(parts.abs().max()) <= 127
    back = sum(parts[:, i * 96:(i + 1) * 96].double() / invariant.LO ** i for i in range(slices)) * scale.double()
    peak = x.abs().amax(dim=1, keepdim=True).double()
    bound = peak / 127 / (2 * invariant.LO ** (slices - 1)) + peak * 2.0 ** -22  # + fp32's own rounding of x/scale
    assert ((back - x.double()).abs() <= bound).all()
    assert scale[5].item() == 1.0 and not parts[5].any()  # a zero row: no 0/0


@needs_exact
def test_int8_linears_are_near_fp32_far_better_than_bf16_and_five_beats_three():
    x = outlier_rows(128, 160, seed=1)
    gen = torch.Generator().manual_seed(2)
    w, b = torch.randn(48, 160, generator=gen) * 0.05, torch.randn(48, generator=gen)
    exact = x.double() @ w.double().T + b.double()
    bf16 = torch.nn.functional.linear(x.bfloat16(), w.bfloat16(), b.bfloat16()).double()
    errors = {}
    for products in (3, 5):
        got = invariant.Int8Linear(w, b, products)(x)
        assert got.dtype == torch.float32
        errors[products] = float((got.double() - exact).abs().max())
    err_bf16 = float((bf16 - exact).abs().max())
    assert errors[3] < err_bf16 / 5 and errors[5] < errors[3] / 2, (errors, err_bf16)


@needs_exact
@pytest.mark.parametrize("products", [3, 5])
def test_a_row_has_the_same_bits_in_any_call(products):
    x = outlier_rows(1000, 128, seed=3)
    lin = invariant.Int8Linear(torch.randn(64, 128), torch.randn(64), products)
    whole = lin(x)
    for size in (1, 7, 16, 333):
        assert torch.equal(torch.cat([lin(t) for t in x.split(size)]), whole)


def test_products_other_than_three_or_five_are_refused():
    with pytest.raises(ValueError, match="3 or 5"):
        invariant.Int8Linear(torch.randn(8, 8), None, 4)


def test_a_saturating_int8_gemm_is_refused(monkeypatch):
    """oneDNN on CPUs without VNNI can clip 16-bit pair sums: the probe must see it (here: a GEMM that clips)."""
    real = torch._int_mm
    monkeypatch.setattr(invariant, "_INT8_EXACT", {})
    monkeypatch.setattr(torch, "_int_mm", lambda a, b: real(a.clamp(-64, 64), b))
    assert invariant.int8_gemm_exact("cpu") is False
    monkeypatch.setattr(invariant, "_INT8_EXACT", {})
    monkeypatch.setattr(torch, "_int_mm", real)
    assert isinstance(invariant.int8_gemm_exact("cpu"), bool)


@needs_exact
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_backends_in_int8_precisions_are_near_fp32_and_say_so(kind, tiny_llama_dir, tiny_bert_dir):
    model_dir = tiny_llama_dir if kind == "llama" else tiny_bert_dir
    seqs = [list(range(5, 60)), list(range(9, 30)), [7] * 40]
    fp32 = HFBackend(test_config(model_dir, dtype="float32")).rewards(PlannedBatch(seqs))
    bf16 = HFBackend(test_config(model_dir, dtype="bfloat16")).rewards(PlannedBatch(seqs))
    err_bf16 = max(abs(a - b) for a, b in zip(bf16, fp32))
    for dtype in ("int8x3", "int8x5"):
        backend = HFBackend(test_config(model_dir, dtype=dtype))
        got = backend.rewards(PlannedBatch(seqs))
        assert got != fp32  # it really computes from int8 slices (a test of the test)
        err = max(abs(a - b) for a, b in zip(got, fp32))
        assert err < max(err_bf16 / 3, 1e-6), (dtype, err, err_bf16)
        assert backend.describe()["dtype"] == dtype and backend.describe()["forward"] == "invariant"
        assert isinstance(backend.invariant.layers[0].q, invariant.Int8Linear)


def test_int8_precisions_need_the_invariant_forward(tiny_llama_dir):
    with pytest.raises(ValueError, match="int8x3 is a precision of the invariant forward"):
        HFBackend(test_config(tiny_llama_dir, dtype="int8x3", forward="transformers"))


def test_int8_precisions_are_refused_where_int8_gemms_are_not_exact(tiny_llama_dir, monkeypatch):
    monkeypatch.setattr("service.backends.hf_backend.int8_gemm_exact", lambda device: False)
    with pytest.raises(ValueError, match="int8x5 needs exact int8 GEMMs"):
        HFBackend(test_config(tiny_llama_dir, dtype="int8x5"))


@needs_exact
def test_a_server_in_int8x5_scores_over_http_and_says_so(tiny_llama_dir):
    """End to end: the precision reaches /v1/models, the model-info metric and the scores (bit-identical alone and
    in a batch, as the start-up self-check found)."""
    import httpx

    from tests.helpers import LiveServer

    with LiveServer(test_config(tiny_llama_dir, model_name="tiny", dtype="int8x5")) as live:
        listed = httpx.get(f"{live.http_url}/v1/models").json()["data"][0]
        assert listed["dtype"] == "int8x5" and listed["batch_invariant"] is True
        metrics = httpx.get(f"{live.http_url}/metrics").text
        assert any("int8x5" in line for line in metrics.splitlines() if line.startswith("rewardserve_model_info"))
        pair = {"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes."}
        other = {"prompt": "Name a colour.", "response": "Blue, or any other you like."}
        alone = httpx.post(f"{live.http_url}/v1/score", json={"inputs": [pair]}).json()
        batch = httpx.post(f"{live.http_url}/v1/score", json={"inputs": [other, pair, other]}).json()
        assert alone["scores"][0] == batch["scores"][1]


def test_a_best_of_n_policy_beside_an_int8_reward_model_runs_in_a_float_dtype():
    """--dtype names the reward model's precision; the generator has no int8 forward (bf16 on CUDA, fp32 on CPU)."""
    from types import SimpleNamespace

    from service.generation.base import device_and_dtype

    assert device_and_dtype(SimpleNamespace(device="cuda", dtype="int8x5")) == ("cuda", "bfloat16")
    assert device_and_dtype(SimpleNamespace(device="cuda:1", dtype="int8x3")) == ("cuda:1", "bfloat16")
    assert device_and_dtype(SimpleNamespace(device="cpu", dtype="int8x5")) == ("cpu", "float32")
    assert device_and_dtype(SimpleNamespace(device="cuda", dtype="float16")) == ("cuda", "float16")


def test_an_unknown_gemm_kind_is_refused_before_anything_is_built():
    from service.backends.invariant_models import build_forward

    with pytest.raises(ValueError, match="unknown GEMM kind 'int4'"):
        build_forward(None, torch.float32, 64, "int4")
