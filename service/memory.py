"""Bounded native memory for a server that runs for days (issue #17; measurements in docs/operations.md, Soak).

Two things grew the server's RSS under steady load while Python's own heap stayed flat (tracemalloc):

1. Kernel caches keyed by shape. A bf16 `F.linear` on CPU runs through oneDNN, and every new row count (the
   packed/tiled rows change with every pass) creates a primitive that is cached twice: in oneDNN's primitive
   cache (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, default 1,024) and in ideep's LRU cache in front of it
   (`LRU_CACHE_CAPACITY`, default 1,024); about 0.5 MB per shape for MiniLM's layers, i.e. up to ~540 MB per
   weight shape before either evicts. A pass uses a handful of shapes (one per weight shape), so a capacity of
   64 keeps every shape a pass needs and costs ~1 ms to create a primitive for a new row count (against a
   pass of 100s of ms). Both are read once, when the first primitive is made: set before the model runs.
   (0 is not a safe value: ideep crashes with LRU_CACHE_CAPACITY=0.)
2. The allocator keeping freed memory. Activations of a different size every pass, freed into glibc's arenas
   (16 on 2 cores), leave holes the arenas keep: mallinfo2 showed bytes in use flat and free-but-kept bytes
   climbing with RSS. `malloc_trim(0)` gives every whole free page back (all arenas); a daemon thread calls it
   every `TRIM_INTERVAL_S`. (Fixing glibc's mmap threshold instead, so that every large tensor is mapped and
   unmapped, kept RSS flat but cut throughput ~3x on 2 cores; MALLOC_ARENA_MAX=2 changed nothing.)

Both are process-wide and made once, by `service.runtime.configure_process`; an operator's own environment
variables win (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `LRU_CACHE_CAPACITY`, and `REWARDSERVE_MALLOC_TRIM_S`: seconds
between trims, 0 turns the trimmer off).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time

log = logging.getLogger("rewardserve.memory")

KERNEL_CACHE_CAPACITY = 64
"""Entries in oneDNN's primitive cache and in ideep's LRU cache (each; default 1,024)."""
KERNEL_CACHE_VARIABLES = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
TRIM_INTERVAL_S = 10.0
"""Seconds between malloc_trim(0) calls."""


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> dict[str, str]:
    """Cap the shape-keyed kernel caches (unless the environment already says): call before the first matmul."""
    if capacity < 1:
        raise ValueError("a kernel cache capacity below 1 is not safe (ideep crashes with 0)")
    for name in KERNEL_CACHE_VARIABLES:
        os.environ.setdefault(name, str(capacity))
    return {name: os.environ[name] for name in KERNEL_CACHE_VARIABLES}


def _malloc_trim():
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim this way
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


class MallocTrimmer:
    """A daemon thread that gives the allocator's free pages back to the system every `interval_s` seconds."""

    def __init__(self, interval_s: float, trim=None):
        self.interval_s = interval_s
        self._trim = trim or _malloc_trim()
        self._stop = threading.Event()
        self.trims = 0
        self._thread = threading.Thread(target=self._run, name="rewardserve-malloc-trim", daemon=True)

    def start(self) -> "MallocTrimmer":
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            start = time.monotonic()
            self._trim(0)
            self.trims += 1
            log.debug("malloc_trim took %.1f ms", (time.monotonic() - start) * 1000.0)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)


_trimmer: MallocTrimmer | None = None


def start_trimmer(interval_s: float | None = None) -> MallocTrimmer | None:
    """Start the process's trimmer once (None where there is no malloc_trim, or the interval is 0)."""
    global _trimmer
    if interval_s is None:
        interval_s = float(os.environ.get("REWARDSERVE_MALLOC_TRIM_S", TRIM_INTERVAL_S))
    trim = _malloc_trim()
    if interval_s <= 0 or trim is None:
        return None
    if _trimmer is None:
        _trimmer = MallocTrimmer(interval_s, trim).start()
    return _trimmer
