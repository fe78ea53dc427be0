"""The element-wise work between a decoder's GEMMs, fused by `torch.compile` (inductor: C++/OpenMP kernels on
CPUs, Triton on CUDA): the batch-invariant forward's `--compile` option.

Between two GEMMs the invariant decoder (service/backends/invariant_models.py) runs many small passes over the
whole pass's rows: the residual add, RMSNorm (square, mean, rsqrt, two products), the cast to the GEMM dtype, the
rotary embedding of q and k, SiLU of the gate times up and the casts of every GEMM's output back to fp32. Fused,
each group is one kernel that reads its inputs once:

- `add_norm`: h + delta (the previous block's output) -> the new fp32 residual stream and its RMSNorm, rounded to
  the GEMM dtype (or fp32: the final norm);
- `norm`: RMSNorm + cast alone (the first layer's input);
- `rotary`: q and k rotated (and cast back to fp32), v cast, from the three GEMM outputs;
- `gated`: act(gate) * up, rounded to the down GEMM's dtype.

Batch invariance holds by the same argument as the unfused rules, and is checked the same way (the backend's
start-up self-check and tests/unit/test_invariance.py's property test run with compile on): every kernel here is
element-wise or reduces within one row (RMSNorm's mean over the hidden size); the row count is the one dynamic
dimension (`mark_dynamic`), so one kernel serves every pass size and a row's vector loop never depends on how many
rows share the call (the inner dimension is the same fixed width in every call). The GEMMs and attention stay
outside the compiled graphs, exactly as without compile.

Compiling costs time once per process and model (tens of seconds cold on 2 cores; inductor caches its kernels on
disk, so a restart is faster): `DecoderForward` compiles at load by running two warm-up passes through the fused path, so no request waits
for it and a compiler failure is found then, not mid-serving. The fused kernels do not round exactly as the
unfused ones (e.g. the mean is summed in another order): bits are a function of the model, the dtype, the
machine and this setting, the same for every request of one server.

Each forward gets its own copies of these functions (their own code objects), so Dynamo's per-function cache
holds one entry per model and never runs out (past `cache_size_limit` Dynamo would silently run a function
uncompiled, which would change bits between models loaded earlier and later).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import types
from typing import Any, Callable

import torch

from service.backends.invariant import rotate

COMPILE_CHOICES = ("auto", "on", "off")


def compiler_missing(device: str) -> str | None:
    """Why torch.compile cannot build kernels for `device` here, or None when it can."""
    if device == "cuda":
        return None if importlib.util.find_spec("triton") else "triton is not installed"
    cxx = os.environ.get("CXX") or "g++"
    if not (shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++")):
        return f"no C++ compiler ({cxx}) on PATH"
    return None


def wants_compile(choice: str, device: str) -> bool:
    """Whether a forward on `device` compiles, for --compile auto | on | off. `auto` is off for now: on a 2-core
    AVX-512-BF16 CPU under jemalloc (the server's allocator) the fused bf16 forward measured 0-8% faster than the
    unfused one, not steadily (its GEMMs already run at ~87% of the bf16 matmul peak; attention is most of the
    rest; docs/benchmarks.md), for ~20 s of compiling at a cold start, and on
    CUDA, where fusing should cut the many small kernel launches, it has not been measured yet
    (`bench/gpu_check.py` compares both). `on` where nothing can compile raises with the reason."""
    if choice not in COMPILE_CHOICES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_CHOICES)}, not {choice!r}")
    if choice != "on":
        return False
    missing = compiler_missing(device)
    if missing:
        raise RuntimeError(f"--compile on: torch.compile cannot build kernels here: {missing}")
    return True


# ---- the fused groups (plain torch: what inductor fuses) -------------------------------------------------------
def _rms(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * weight


def _norm(h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    return _rms(h, weight, eps).to(dtype)


def _add_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
              dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    h = h + delta.float()
    return h, _rms(h, weight, eps).to(dtype)


def _rotary(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
            heads: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows = q.shape[0]
    q = rotate(q.float().view(rows, heads, dim), cos, sin)
    k = rotate(k.float().view(rows, kv_heads, dim), cos, sin)
    return q, k, v.float().view(rows, kv_heads, dim)


def _gated(gate: torch.Tensor, up: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor],
           dtype: torch.dtype) -> torch.Tensor:
    return (act(gate.float()) * up.float()).to(dtype)


def _own_copy(fn: Callable) -> Callable:
    """`fn` with a code object of its own (Dynamo keeps its compiled entries per code object)."""
    return types.FunctionType(fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__)


class FusedDecoderOps:
    """One model's compiled groups. Every tensor argument's first dimension (rows) is dynamic."""

    def __init__(self, act: Callable[[torch.Tensor], torch.Tensor]):
        self.act = act
        opts: dict[str, Any] = {"dynamic": False, "fullgraph": True}
        self._norm = torch.compile(_own_copy(_norm), **opts)
        self._add_norm = torch.compile(_own_copy(_add_norm), **opts)
        self._rotary = torch.compile(_own_copy(_rotary), **opts)
        self._gated = torch.compile(_own_copy(_gated), **opts)

    @staticmethod
    def _rows_dynamic(*tensors: torch.Tensor) -> None:
        for t in tensors:
            torch._dynamo.mark_dynamic(t, 0)

    def norm(self, h: torch.Tensor, weight: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
        self._rows_dynamic(h)
        return self._norm(h, weight, eps, dtype)

    def add_norm(self, h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        self._rows_dynamic(h, delta)
        return self._add_norm(h, delta, weight, eps, dtype)

    def rotary(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               heads: int, kv_heads: int, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self._rows_dynamic(q, k, v, cos, sin)
        return self._rotary(q, k, v, cos, sin, heads, kv_heads, dim)

    def gated(self, gate: torch.Tensor, up: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        self._rows_dynamic(gate, up)
        return self._gated(gate, up, self.act, dtype)
