"""Which precision a machine runs natively, decided at run time (the project's machines differ: AVX2-only AMD
CPUs emulate bf16 and run it slower than fp32; AVX-512-BF16 and AMX CPUs, and CUDA GPUs, run it natively)."""

from __future__ import annotations

from typing import Any


INT8_PRODUCTS = {"int8x3": 3, "int8x5": 5}
"""The int8 precisions of the invariant forward (`--dtype`), by the number of int8 products per matmul
(service/backends/invariant.py, `Int8Linear`)."""


def machine() -> dict[str, Any]:
    """The ISA facts a benchmark or a startup log prints beside its figures."""
    import platform

    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_model() or platform.processor() or platform.machine(),
        "cores": _cores(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "amx": bool(_probe(torch.cpu, "_is_amx_tile_supported")),
        "avx512_bf16": bool(_probe(torch.cpu, "_is_avx512_bf16_supported")),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def native_bf16(device: str) -> bool:
    """bf16 matmuls run natively: a CUDA device that supports bf16, or a CPU with AMX or AVX-512-BF16."""
    import torch

    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return bool(_probe(torch.cpu, "_is_amx_tile_supported") or _probe(torch.cpu, "_is_avx512_bf16_supported"))


def auto_dtype(device: str) -> Any:
    import torch

    return torch.bfloat16 if native_bf16(device) else torch.float32


def _probe(module: Any, name: str) -> bool:
    fn = getattr(module, name, None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:  # an old torch, or an ISA check that cannot run here
        return False


def _cores() -> int:
    import os

    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
