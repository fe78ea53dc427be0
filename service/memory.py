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
2. glibc's malloc keeping freed memory. Activations of a different size every pass (the row count changes
   with every batch), freed into glibc's heaps, leave holes that it keeps: mallinfo2 showed the bytes in use
   flat (~300 MB for MiniLM) while the bytes free-but-kept climbed with RSS, window after window. Neither
   MALLOC_ARENA_MAX=2 or 1 nor a periodic malloc_trim(0) stopped it (trim lowered RSS by ~150 MB, the climb
   went on); a fixed mmap threshold (every large tensor mapped and unmapped) kept RSS flat but cut throughput
   ~3x. jemalloc (Debian's libjemalloc2), tuned as `JEMALLOC_CONF` says, kept RSS flat (778 -> 795 MB in
   6 minutes, against glibc's 770 -> 1,035 MB side by side) and answered more (862 against 699 requests).
   So `rewardserve serve` runs itself under jemalloc when the library is installed: `use_jemalloc`
   re-executes the process (same PID, same arguments) with it in LD_PRELOAD, before the model is loaded.
   Without it the server warns once and trims glibc's free pages every `TRIM_INTERVAL_S` (which lowers RSS
   by ~150 MB but does not stop the climb).

Both are process-wide and made once, by `service.runtime.configure_process`. The operator's environment wins:
`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, `LRU_CACHE_CAPACITY`; `REWARDSERVE_ALLOCATOR` = `auto` (default: jemalloc if
found), `system` (glibc, no re-exec) or a library path to preload; `MALLOC_CONF` (jemalloc's, instead of
`JEMALLOC_CONF`); `REWARDSERVE_MALLOC_TRIM_S` (seconds between trims under glibc; 0: none).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys
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


JEMALLOC_PATHS = tuple(f"{d}/libjemalloc.so.2" for d in (
    "/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib"))
_EXEC_MARK = "_REWARDSERVE_ALLOCATOR_EXEC"
DEFAULT_ALLOCATOR = "auto"
"""REWARDSERVE_ALLOCATOR's default: jemalloc where it is installed."""
JEMALLOC_CONF = "oversize_threshold:0,background_thread:true,dirty_decay_ms:-1,muzzy_decay_ms:-1"
"""MALLOC_CONF for the re-executed server, unless the operator set one. With jemalloc's defaults, allocations over
8 MB (a pass's activations) go to an arena that returns its pages at once, so every pass faults them in again:
2.4x less throughput than glibc. `oversize_threshold:0` keeps them in the ordinary arenas; with no decay, pages
stay with the process at their high-water mark (flat, as jemalloc's size classes do not fragment like glibc's
heaps) and are reused without faults; a background thread does jemalloc's housekeeping."""


def find_jemalloc() -> str | None:
    for path in JEMALLOC_PATHS:
        if os.path.exists(path):
            return path
    return ctypes.util.find_library("jemalloc")  # a soname the dynamic loader finds, or None


def allocator() -> str:
    """The allocator this process runs on: 'jemalloc' when it is loaded (preloaded), else 'system'."""
    try:
        maps = open("/proc/self/maps").read()
    except OSError:
        return "system"
    return "jemalloc" if "libjemalloc" in maps else "system"


def use_jemalloc(execve=os.execve) -> str | None:
    """Re-execute this process with jemalloc preloaded (Linux, when found, unless REWARDSERVE_ALLOCATOR=system or
    it is preloaded already). Returns the library it would use, or None; returns at all only if it did not exec.
    Call it before threads start or the model loads: everything done so far is done again."""
    choice = os.environ.get("REWARDSERVE_ALLOCATOR", DEFAULT_ALLOCATOR)
    if choice == "system" or not sys.platform.startswith("linux") or os.environ.get(_EXEC_MARK):
        return None
    if allocator() == "jemalloc":
        return None
    lib = find_jemalloc() if choice in ("auto", "jemalloc") else choice
    if lib is None:
        log.warning("jemalloc not found (Debian: apt-get install libjemalloc2): serving on glibc's malloc, whose RSS "
                    "creeps under long varied load (docs/operations.md, Soak); REWARDSERVE_ALLOCATOR=system hides this")
        return None
    env = dict(os.environ)
    env["LD_PRELOAD"] = " ".join(p for p in (lib, env.get("LD_PRELOAD", "")) if p)
    env.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    env[_EXEC_MARK] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    argv = [sys.executable, *getattr(sys, "orig_argv", [sys.executable, *sys.argv])[1:]]
    execve(sys.executable, argv, env)
    return lib


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
    if allocator() == "jemalloc":  # jemalloc gives pages back itself (dirty pages decay in ~10 s)
        return None
    if interval_s is None:
        interval_s = float(os.environ.get("REWARDSERVE_MALLOC_TRIM_S", TRIM_INTERVAL_S))
    trim = _malloc_trim()
    if interval_s <= 0 or trim is None:
        return None
    if _trimmer is None:
        _trimmer = MallocTrimmer(interval_s, trim).start()
    return _trimmer
