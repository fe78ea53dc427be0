"""The server's native memory bounds (service/memory.py, issue #17): the shape-keyed kernel caches hold their
capacity, the trimmer trims and stops, and bench/soak.py's slope finds growth and ignores noise."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from service import memory

ROOT = Path(__file__).resolve().parents[2]

# One process: optionally bound the caches (as configure_process does, after torch is imported and before the
# first matmul), then a bf16 linear layer over SHAPES distinct row counts; prints the allocator's bytes in use
# that stayed behind (glibc mallinfo2), in MB.
_PROBE = """
import ctypes, json, os, sys
import torch, torch.nn.functional as F
from service import memory
if sys.argv[1] == "bounded":
    memory.bound_kernel_caches()
class M(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
fn = ctypes.CDLL(None).mallinfo2
fn.restype = M
def in_use():
    m = fn()
    return (m.uordblks + m.hblkhd) / 2**20
torch.set_num_threads(1)
w = torch.randn(384, 384).bfloat16()
F.linear(torch.randn(16, 384).bfloat16(), w)
base = in_use()
for rows in range(1, int(sys.argv[2]) + 1):
    F.linear(torch.randn(rows, 384).bfloat16(), w)
print(json.dumps({"grew_mb": in_use() - base, "env": {k: os.environ.get(k) for k in memory.KERNEL_CACHE_VARIABLES}}))
"""
SHAPES = 320


def _grown(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in memory.KERNEL_CACHE_VARIABLES}
    env["PYTHONPATH"] = str(ROOT)
    if mode == "defaults":  # the libraries' own capacities, stated
        env.update({k: "1024" for k in memory.KERNEL_CACHE_VARIABLES})
    out = subprocess.run([sys.executable, "-c", _PROBE, mode, str(SHAPES)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_kernel_caches_hold_their_bound():
    try:
        import ctypes

        ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2")
    bounded = _grown("bounded")
    cap = memory.KERNEL_CACHE_CAPACITY
    assert bounded["env"] == {k: str(cap) for k in memory.KERNEL_CACHE_VARIABLES}
    # ~0.26 MB per cached shape in each of the two caches (measured): 64 + 64 entries ~ 34 MB, whatever the count
    # of shapes seen; 80 MB leaves room for the allocator's own noise.
    assert bounded["grew_mb"] < 80, bounded
    unbounded = _grown("defaults")
    if unbounded["grew_mb"] < 120:  # this CPU's bf16 matmul does not go through oneDNN: nothing cached per shape
        pytest.skip(f"no per-shape kernel cache here (defaults grew {unbounded['grew_mb']:.0f} MB)")
    assert bounded["grew_mb"] < unbounded["grew_mb"] / 2


def test_bound_respects_the_operator(monkeypatch):
    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "256")
    monkeypatch.delenv("LRU_CACHE_CAPACITY", raising=False)
    assert memory.bound_kernel_caches() == {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "256",
                                            "LRU_CACHE_CAPACITY": str(memory.KERNEL_CACHE_CAPACITY)}
    with pytest.raises(ValueError):
        memory.bound_kernel_caches(0)


def test_trimmer_trims_until_stopped():
    calls = threading.Semaphore(0)
    trimmer = memory.MallocTrimmer(0.001, trim=lambda pad: calls.release()).start()
    assert all(calls.acquire(timeout=10) for _ in range(3))
    trimmer.stop()
    assert not trimmer._thread.is_alive() and trimmer.trims >= 3


def test_trimmer_off(monkeypatch):
    monkeypatch.setenv("REWARDSERVE_MALLOC_TRIM_S", "0")
    assert memory.start_trimmer() is None


def _soak():
    sys.path.insert(0, str(ROOT))
    from bench.soak import rss_trend

    return rss_trend


def test_soak_slope_finds_growth_and_ignores_noise():
    rss_trend = _soak()
    rng = random.Random(0)
    flat = [(t, 1000 + rng.uniform(-60, 60)) for t in range(1800)]  # windows swing by tens of MB
    out = rss_trend(flat, 1800, [1000.0, 1010.0, 990.0], 995.0, 2.0, 300)
    assert out["growth_mb_per_window"] == [5.0, 10.0, -20.0]
    assert abs(out["slope_pct_per_10min"]) < 1.0 and out["slope_ok"] is True
    creeping = [(t, 1000 + 0.05 * t) for t in range(1800)]  # +30 MB per 10 minutes: ~2.9 % of 1,045 MB
    out = rss_trend(creeping, 1800, [None], None, 2.0, 300)
    assert out["slope_mb_per_10min"] == pytest.approx(30.0) and out["slope_ok"] is False
    short = rss_trend(creeping[:60], 60, [None], None, 2.0, 300)
    assert short["slope_ok"] is None  # a 30 s half says nothing about 10 minutes


def test_use_jemalloc_reexecutes_with_the_library_preloaded(monkeypatch):
    calls = []
    monkeypatch.delenv("_REWARDSERVE_ALLOCATOR_EXEC", raising=False)
    monkeypatch.setenv("REWARDSERVE_ALLOCATOR", "/opt/lib/libjemalloc.so.2")
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    assert memory.use_jemalloc(execve=lambda *a: calls.append(a)) == "/opt/lib/libjemalloc.so.2"
    (path, argv, env), = calls
    assert path == sys.executable and argv[0] == sys.executable and argv[1:] == sys.orig_argv[1:]
    assert env["LD_PRELOAD"] == "/opt/lib/libjemalloc.so.2 libother.so" and env["_REWARDSERVE_ALLOCATOR_EXEC"] == "1"
    assert env["MALLOC_CONF"] == memory.JEMALLOC_CONF  # no oversize arena: see its docstring
    monkeypatch.setenv("_REWARDSERVE_ALLOCATOR_EXEC", "1")  # the re-executed process does not do it again
    assert memory.use_jemalloc(execve=lambda *a: calls.append(a)) is None and len(calls) == 1


def test_use_jemalloc_system_opts_out(monkeypatch):
    monkeypatch.delenv("_REWARDSERVE_ALLOCATOR_EXEC", raising=False)
    monkeypatch.setenv("REWARDSERVE_ALLOCATOR", "system")
    assert memory.use_jemalloc(execve=lambda *a: pytest.fail("must not exec")) is None


def test_a_process_runs_itself_under_jemalloc_when_installed():
    if memory.find_jemalloc() is None:
        pytest.skip("jemalloc is not installed here (Debian: libjemalloc2)")
    env = {k: v for k, v in os.environ.items() if k not in ("REWARDSERVE_ALLOCATOR", "_REWARDSERVE_ALLOCATOR_EXEC")}
    env.update(PYTHONPATH=str(ROOT), REWARDSERVE_ALLOCATOR="auto")
    code = "import os; from service import memory; memory.use_jemalloc(); print(memory.allocator(), os.getpid())"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.split() == ["jemalloc", str(proc.pid)]  # same process, now on jemalloc
