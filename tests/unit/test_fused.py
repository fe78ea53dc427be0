"""`--compile`: the invariant decoder's element-wise work fused by torch.compile (service/backends/fused.py).

Batch invariance of the compiled forward is part of tests/unit/test_invariance.py's property test (the
`-compiled` parameters); here: the fused math is the unfused math, `auto` is off, compiler failures stop a server asked to
compile (and a non-strict build falls back to the unfused forward), and a live server reports it."""

from __future__ import annotations

import pytest

from service.backends.fused import compiler_missing, wants_compile
from service.backends.hf_backend import HFBackend
from service.grouping import PlannedBatch
from tests.helpers import test_config

needs_compiler = pytest.mark.skipif(compiler_missing("cpu") is not None,
                                    reason=f"torch.compile cannot build CPU kernels here: {compiler_missing('cpu')}")

SEQS = [list(range(5, 60)), list(range(40, 7, -1)), [9] * 130, list(range(100, 300, 3))]


@needs_compiler
def test_the_fused_forward_computes_what_the_unfused_one_does(tiny_llama_dir):
    """In fp32 the fused kernels only reorder a norm's sum: rewards within float noise of the unfused forward (a
    wrong rotary half, norm weight or activation would be far off)."""
    plain = HFBackend(test_config(tiny_llama_dir, compile="off"))
    fused = HFBackend(test_config(tiny_llama_dir, compile="on"))
    assert fused.invariant.compiled and not plain.invariant.compiled
    a, b = plain.rewards(PlannedBatch(SEQS)), fused.rewards(PlannedBatch(SEQS))
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4 * max(1.0, max(map(abs, a)))
    assert len(set(a)) == len(SEQS)  # the inputs really differ (a test of the test)


@needs_compiler
def test_bf16_fused_is_as_near_fp32_as_bf16_unfused(tiny_llama_dir):
    ref = HFBackend(test_config(tiny_llama_dir, dtype="float32")).rewards(PlannedBatch(SEQS))
    errors = {}
    for compile in ("off", "on"):
        got = HFBackend(test_config(tiny_llama_dir, dtype="bfloat16", compile=compile)).rewards(PlannedBatch(SEQS))
        errors[compile] = max(abs(x - y) for x, y in zip(got, ref))
    assert errors["on"] < 2 * errors["off"] + 1e-3


def test_auto_is_off_and_on_needs_a_compiler(tiny_llama_dir, monkeypatch):
    """`auto` compiles nothing yet (no speed-up measured; docs/benchmarks.md); `on` without a compiler stops the
    server with the reason."""
    assert wants_compile("off", "cpu") is False
    assert wants_compile("auto", "cpu") is False and wants_compile("auto", "cuda") is False
    with pytest.raises(ValueError, match="compile must be one of"):
        wants_compile("yes", "cpu")
    assert HFBackend(test_config(tiny_llama_dir, dtype="bfloat16")).describe()["compiled"] is False
    monkeypatch.setattr("service.backends.fused.shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C.. compiler"):
        HFBackend(test_config(tiny_llama_dir, dtype="bfloat16", compile="on"))


@needs_compiler
def test_a_compiler_failure_stops_the_server_with_the_reason(tiny_llama_dir, monkeypatch):
    from service.backends import fused

    def broken(self, *args, **kwargs):
        raise RuntimeError("C++ compile error: simulated")

    monkeypatch.setattr(fused.FusedDecoderOps, "norm", broken)
    with pytest.raises(RuntimeError, match="--compile on: compiling the fused forward failed: C.. compile error"):
        HFBackend(test_config(tiny_llama_dir, dtype="bfloat16", compile="on"))


@needs_compiler
def test_a_fallback_is_the_unfused_forward_bit_for_bit(tiny_llama_dir, monkeypatch, caplog):
    """build_forward(compile=True) (non-strict, as bench/gpu_check.py asks) runs unfused when compiling fails."""
    from service.backends import fused
    from service.backends.invariant_models import build_forward

    backend = HFBackend(test_config(tiny_llama_dir, dtype="bfloat16", compile="off"))
    unfused = backend.rewards(PlannedBatch(SEQS))
    monkeypatch.setattr(fused.FusedDecoderOps, "norm", lambda self, *a: 1 / 0)
    backend.invariant = build_forward(backend.model, backend.dtype, backend.max_length, compile=True)
    assert not backend.invariant.compiled and "ZeroDivisionError" in backend.invariant.compile_error
    assert "running it unfused" in caplog.text
    assert backend.rewards(PlannedBatch(SEQS)) == unfused


@needs_compiler
def test_encoders_are_served_unfused_under_compile_on(tiny_bert_dir):
    assert HFBackend(test_config(tiny_bert_dir, dtype="bfloat16", compile="on")).describe()["compiled"] is False


@needs_compiler
def test_a_compiled_server_says_so_and_keeps_batch_invariance(tiny_llama_dir):
    import httpx

    from tests.helpers import LiveServer

    with LiveServer(test_config(tiny_llama_dir, model_name="tiny", dtype="bfloat16", compile="on")) as live:
        listed = httpx.get(f"{live.http_url}/v1/models").json()["data"][0]
        assert listed["compiled"] is True and listed["batch_invariant"] is True
        metrics = httpx.get(f"{live.http_url}/metrics").text
        info = [line for line in metrics.splitlines() if line.startswith("rewardserve_model_info")]
        assert any('compiled="true"' in line for line in info)
        pair = {"prompt": "How do I boil an egg?", "response": "Simmer it for nine minutes."}
        other = {"prompt": "Name a colour.", "response": "Blue, or any other you like."}
        alone = httpx.post(f"{live.http_url}/v1/score", json={"inputs": [pair]}).json()
        batch = httpx.post(f"{live.http_url}/v1/score", json={"inputs": [other, pair, other]}).json()
        assert alone["scores"][0] == batch["scores"][1]
