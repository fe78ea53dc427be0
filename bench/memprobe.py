"""Where does a server's memory go? Runs `rewardserve serve ...` in this process with a sampler thread.

    python bench/memprobe.py --out probe.jsonl --every 30 [--tracemalloc 25] -- serve --model minilm ...
    python bench/soak.py --probe-out probe.jsonl ...      # the same, through the soak

Every `--every` seconds one JSON line goes to `--out`: RSS and its anonymous part (/proc/self/status), glibc's
allocator totals (mallinfo2: bytes in use, bytes free but kept, mmapped bytes, summed over every arena) and its
arena count (malloc_info), the number of threads, Python's allocated blocks and, with `--tracemalloc N`, the
Python heap traced and the N source lines whose traced size grew most since the previous sample. Telling these
apart is the diagnosis: RSS growth with flat `in_use` is the allocator keeping freed memory (fragmentation,
arenas); growth in `in_use` with flat tracemalloc is native (torch, oneDNN); growth in tracemalloc names the
Python line. A diagnostic tool: it is not how the server is run in production.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _libc() -> Any:
    return ctypes.CDLL(None)


def mallinfo() -> dict[str, float] | None:
    """glibc's totals over all arenas, MB (None off glibc)."""
    libc = _libc()
    fn = getattr(libc, "mallinfo2", None)
    if fn is None:
        return None
    fn.restype = _MallInfo2
    m = fn()
    mb = 1024 * 1024
    return {"heap_mb": round(m.arena / mb, 1), "mmap_mb": round(m.hblkhd / mb, 1), "mmap_blocks": m.hblks,
            "in_use_mb": round((m.uordblks + m.hblkhd) / mb, 1), "free_kept_mb": round(m.fordblks / mb, 1)}


def arena_count() -> int | None:
    """Number of glibc malloc arenas (from malloc_info's XML)."""
    libc = _libc()
    if getattr(libc, "malloc_info", None) is None:
        return None
    buf, size = ctypes.c_char_p(), ctypes.c_size_t()
    libc.open_memstream.restype = ctypes.c_void_p
    fp = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
    if not fp:
        return None
    libc.malloc_info(0, ctypes.c_void_p(fp))
    libc.fclose(ctypes.c_void_p(fp))
    text = ctypes.string_at(buf, size.value).decode(errors="replace")
    libc.free(buf)
    return len(re.findall(r"<heap nr=", text))


def proc_status() -> dict[str, float]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "Threads"):
            parts = value.split()
            out[key] = int(parts[0]) / 1024.0 if key != "Threads" else int(parts[0])
    return {"rss_mb": round(out.get("VmRSS", 0.0), 1), "anon_mb": round(out.get("RssAnon", 0.0), 1),
            "threads": int(out.get("Threads", 0))}


def sampler(out: Path, every: float, top: int, trim: bool) -> None:
    import tracemalloc

    start = time.monotonic()
    previous = None
    with out.open("a") as f:
        while True:
            row: dict[str, Any] = {"t_s": round(time.monotonic() - start, 1), **proc_status()}
            row["malloc"] = mallinfo()
            row["arenas"] = arena_count()
            # not len(gc.get_objects()): that list references every object, and a tuple another thread is still
            # building (refcount 1 required to resize it) then fails with SystemError
            row["py_blocks"] = sys.getallocatedblocks()
            if tracemalloc.is_tracing():
                snap = tracemalloc.take_snapshot().filter_traces(
                    [tracemalloc.Filter(False, tracemalloc.__file__)])
                row["traced_mb"] = round(sum(s.size for s in snap.statistics("filename")) / 2**20, 2)
                if previous is not None:
                    diff = snap.compare_to(previous, "lineno")
                    row["grew"] = [{"at": f"{d.traceback[0].filename}:{d.traceback[0].lineno}",
                                    "kb": round(d.size_diff / 1024, 1), "count": d.count_diff}
                                   for d in diff[:top] if d.size_diff > 0]
                previous = snap
            if trim:  # what the allocator kept but could give back
                before = proc_status()["rss_mb"]
                _libc().malloc_trim(0)
                row["trimmed_mb"] = round(before - proc_status()["rss_mb"], 1)
            f.write(json.dumps(row) + "\n")
            f.flush()
            time.sleep(every)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: memprobe.py --out FILE [--every S] [--tracemalloc N] -- serve ...")
    split = argv.index("--")
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--every", type=float, default=30.0)
    p.add_argument("--tracemalloc", type=int, default=0, help="trace Python allocations; report the top N growths")
    p.add_argument("--trim", action="store_true", help="call malloc_trim(0) after each sample (what it gives back)")
    args = p.parse_args(argv[:split])
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start(1)
    threading.Thread(target=sampler, args=(Path(args.out), args.every, args.tracemalloc or 10, args.trim), daemon=True,
                     name="memprobe").start()
    from rewardserve.cli import main as cli_main

    return cli_main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
