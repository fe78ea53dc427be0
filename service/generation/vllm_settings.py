"""What an in-process vLLM needs on this machine, set by the code (a user running the CLI has no Makefile):
used by the Best-of-N generator, the vLLM scoring backend and training's vLLM rollouts.

- The engine runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, unless the user set it): it starts in
  seconds instead of spawning a second process.
- On CPU, vLLM's default KV cache is a share of the machine's TOTAL memory (its `gpu_memory_utilization`, 0.92 on
  CPU too), and it refuses to start when that much is not free: "Available memory ... less than desired CPU memory
  utilization". We ask for an explicit size instead (`--vllm-kv-cache-gib`, default 1 GiB: plenty for small models;
  an exported VLLM_CPU_KVCACHE_SPACE still wins, as vLLM reads it last), and check first that it fits, with a
  message that says what to change.
"""

from __future__ import annotations

import os
from typing import Any

GIB = 1 << 30
DEFAULT_KV_CACHE_GIB = 1.0


class VllmMemoryError(ValueError):
    """vLLM cannot get the memory it needs; the message says what to change."""


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def engine_kwargs(on_cpu: bool, kv_cache_gib: float | None = None) -> dict[str, Any]:
    """Keyword arguments for vLLM's `LLM(...)` / `EngineArgs(...)`, after preparing the process environment."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not on_cpu:
        return {}
    gib = kv_cache_gib if kv_cache_gib is not None else DEFAULT_KV_CACHE_GIB
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        gib = float(os.environ["VLLM_CPU_KVCACHE_SPACE"])  # vLLM applies it itself; check what it will ask for
    wanted = int(gib * GIB)
    available = available_memory_bytes()
    if available is not None and wanted > available:
        raise VllmMemoryError(
            f"vLLM needs {gib:g} GiB for its KV cache but only {available / GIB:.1f} GiB of memory is available: "
            f"lower --vllm-kv-cache-gib (or VLLM_CPU_KVCACHE_SPACE), or free memory"
        )
    return {"kv_cache_memory_bytes": wanted}


def explain_start_failure(exc: BaseException) -> BaseException:
    """vLLM's memory refusals, reworded with the setting to change; other errors as they are."""
    text = str(exc)
    if "Available memory" in text or "kv cache" in text.lower() and "memory" in text.lower():
        return VllmMemoryError(f"vLLM could not reserve its memory: {text.splitlines()[0]} -- lower "
                               "--vllm-kv-cache-gib (or VLLM_CPU_KVCACHE_SPACE), or free memory")
    return exc
