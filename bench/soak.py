"""Soak: a live rewardserve driven at about twice its measured capacity for a bounded time.

    python bench/soak.py                           # minilm, 60 s at 2x capacity (~2-3 min in all on 2 cores)
    python bench/soak.py --duration 1800           # half an hour
    python bench/soak.py --model tiny --duration 20 --capacity-s 5   # smoke run on a tiny untrained BERT

Phases: start `rewardserve serve` (a subprocess on free loopback ports, stopped by this script) -> capacity: a
closed loop of --clients callers for --capacity-s seconds gives the requests/s the server sustains -> soak: an
open loop sends --factor x that rate, on a fixed schedule, for --duration seconds, cut into --window second
windows -> after: /ready must be 200 and a probe request must score exactly as before the soak -> SIGTERM (the
server drains and must exit 0).

Past capacity the server's queue (--max-queue inputs) fills and the excess is refused at once with 429: that is
the expected answer. Per window: requests sent, 200s, 429s, 5xx, failures (timeouts, connection errors),
latency p50/p99 of the answered ones and p99 of the refused ones, the server's RSS (max over 1 s samples, the
last sample, and its growth since the previous window's last) and queue depth (max over samples). Memory: the
slope of a least-squares line through the RSS samples of the second half (after the warm-up), in MB and % per
10 minutes. Progress goes to stderr, a table to stdout, and the LAST line of stdout is one JSON object (with the
machine's CPU and ISA). Exit 0 when there was no 5xx, no failure, the probe matched, the server exited 0 and the
second-half slope stayed within --max-slope-pct (judged when that half spans at least --slope-min-s seconds).
--server-env and --probe-out (bench/memprobe.py) are for diagnosing memory: allocator settings side by side.
Request texts are synthetic or cut from HH-RLHF (as in bench/serve.py); none is ever printed.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse
import asyncio
import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.loadgen import HttpScorer, closed_loop

T_START = time.monotonic()


def log(message: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="`tiny` (a 2-layer BERT built here) or any model spec serve takes")
    p.add_argument("--duration", type=float, default=60.0, help="soak seconds (default 60)")
    p.add_argument("--window", type=float, default=10.0, help="seconds per reported window (default 10)")
    p.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity (default 2)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="offer this many requests/s instead of --factor x the measured capacity (capacity is still "
                        "measured and reported): the same load for servers compared side by side")
    p.add_argument("--capacity-s", type=float, default=15.0, help="seconds of the capacity measurement (default 15)")
    p.add_argument("--clients", type=int, default=8, help="closed-loop callers for the capacity measurement")
    p.add_argument("--inputs-per-request", type=int, default=4, help="pairs per request (default 4)")
    p.add_argument("--pairs", type=int, default=64, help="distinct pairs in the workload")
    p.add_argument("--min-tokens", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--max-queue", type=int, default=64,
                   help="the server's --max-queue, inputs (default 64: past capacity, a few seconds of queue)")
    p.add_argument("--max-in-flight", type=int, default=1024, help="open requests at most; past it a send is skipped")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="server torch threads")
    p.add_argument("--server-args", default="", help="extra `rewardserve serve` flags, as one string")
    p.add_argument("--request-timeout", type=float, default=60.0, help="a request without answer by then is a failure")
    p.add_argument("--start-timeout", type=float, default=300.0)
    p.add_argument("--log-dir", help="keep the server log here (default: a temp dir)")
    p.add_argument("--max-slope-pct", type=float, default=2.0,
                   help="fail when the server's RSS grows faster than this, in %% per 10 minutes, over the second "
                        "half of the soak (default 2; see docs/operations.md)")
    p.add_argument("--slope-min-s", type=float, default=600.0,
                   help="judge the slope only when the second half lasts at least this many seconds (default 600: "
                        "over shorter halves, RSS swings alone gave flat servers slopes of +-3 %%)")
    p.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for the server only (repeatable): compare allocator settings")
    p.add_argument("--probe-out", help="run the server under bench/memprobe.py, writing its samples (JSON lines) "
                   "here: allocator totals, arenas, threads, Python objects")
    p.add_argument("--probe-every", type=float, default=30.0, help="seconds between memprobe samples")
    p.add_argument("--probe-tracemalloc", type=int, default=0,
                   help="with --probe-out: trace Python allocations, report the N lines that grew most")
    p.add_argument("--probe-trim", action="store_true", help="with --probe-out: malloc_trim(0) after each sample")
    return p.parse_args(argv)


# ---- the workload --------------------------------------------------------------------------------------
def model_spec(args: argparse.Namespace, tmp: Path) -> str:
    if args.model != "tiny":
        return args.model
    from tests.helpers import make_tiny_bert_rm

    return str(make_tiny_bert_rm(tmp / "tiny-bert-rm"))


def request_bodies(spec: str, args: argparse.Namespace) -> tuple[list[bytes], list[int]]:
    """One JSON body per request (--inputs-per-request pairs each) and its tokens."""
    import transformers

    from bench.workload import build_pairs, served_max_length
    from rewardmodel.modeling import load_tokenizer, resolve_model

    transformers.logging.set_verbosity_error()
    source = resolve_model(spec)
    tokenizer = load_tokenizer(source)
    pairs, _ = build_pairs(tokenizer, served_max_length(source, tokenizer), args.pairs, args.min_tokens,
                           args.max_tokens)
    k = args.inputs_per_request
    groups = [pairs[i:i + k] for i in range(0, len(pairs) - k + 1, k)]
    bodies = [json.dumps({"inputs": [p.as_input() for p in g]}).encode() for g in groups]
    return bodies, [sum(p.tokens for p in g) for g in groups]


# ---- sampling the server -------------------------------------------------------------------------------
def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def server_allocator(pid: int) -> str | None:
    """'jemalloc' when the server runs on it (rewardserve re-executes itself under jemalloc where installed)."""
    try:
        maps = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    return "jemalloc" if "libjemalloc" in maps else "tcmalloc" if "libtcmalloc" in maps else "glibc"


def queue_depth(metrics_text: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    return sum(s.value for f in text_string_to_metric_families(metrics_text) for s in f.samples
               if s.name == "rewardserve_queue_depth")


@dataclass
class Window:
    index: int
    sent: int = 0
    ok: int = 0
    overloaded: int = 0
    server_errors: int = 0  # 5xx
    failures: int = 0  # timeouts, connection errors, other statuses
    skipped: int = 0  # not sent: --max-in-flight open requests already
    ok_ms: list[float] = field(default_factory=list, repr=False)
    refused_ms: list[float] = field(default_factory=list, repr=False)
    rss_mb: list[float] = field(default_factory=list, repr=False)
    rss_t: list[float] = field(default_factory=list, repr=False)  # soak seconds of each RSS sample
    depth: list[float] = field(default_factory=list, repr=False)
    samples: list[str] = field(default_factory=list)

    def to_json(self, window_s: float) -> dict[str, Any]:
        return {
            "window": self.index, "t_end_s": round((self.index + 1) * window_s, 1), "sent": self.sent,
            "ok": self.ok, "overloaded_429": self.overloaded, "5xx": self.server_errors, "failures": self.failures,
            "skipped": self.skipped, "ok_per_s": round(self.ok / window_s, 2),
            "p50_ms": pct(self.ok_ms, 50), "p99_ms": pct(self.ok_ms, 99), "p99_429_ms": pct(self.refused_ms, 99),
            "rss_mb_max": round(max(self.rss_mb), 1) if self.rss_mb else None,
            "rss_mb_end": round(self.rss_mb[-1], 1) if self.rss_mb else None,
            "queue_depth_max": max(self.depth) if self.depth else None, "error_samples": self.samples[:3],
        }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    return round(data[min(len(data) - 1, max(0, -(-len(data) * q // 100) - 1))], 1)  # nearest rank


def rss_trend(samples: list[tuple[float, float]], duration_s: float, window_ends: list[float | None],
              start_mb: float | None, max_pct: float, min_half_s: float) -> dict[str, Any]:
    """RSS growth per window and the slope over the second half of the soak.

    samples: (soak seconds, RSS MB), one a second. The slope is a least-squares line through every sample of the
    second half (the first half holds the warm-up: the allocator and the kernel caches filling), in MB per
    10 minutes and in % of the line's value where the half starts. It is judged (`slope_ok`) only when the half
    lasts at least `min_half_s`: over a shorter span, window-to-window noise (tens of MB as batches come and go)
    extrapolated to 10 minutes says nothing."""
    growth, previous = [], start_mb
    for end in window_ends:
        growth.append(None if end is None or previous is None else round(end - previous, 1))
        previous = end if end is not None else previous
    half = [(t, r) for t, r in samples if t >= duration_s / 2]
    out: dict[str, Any] = {"growth_mb_per_window": growth, "second_half_from_s": round(duration_s / 2, 1),
                           "max_slope_pct_per_10min": max_pct}
    if len(half) < 3 or half[-1][0] - half[0][0] <= 0:
        return {**out, "slope_mb_per_10min": None, "slope_pct_per_10min": None, "slope_ok": None}
    n = len(half)
    mt, mr = sum(t for t, _ in half) / n, sum(r for _, r in half) / n
    var = sum((t - mt) ** 2 for t, _ in half)
    slope = sum((t - mt) * (r - mr) for t, r in half) / var  # MB per second
    at_start = mr + slope * (half[0][0] - mt)
    per_10 = slope * 600.0
    pct = 100.0 * per_10 / at_start if at_start > 0 else None
    span = half[-1][0] - half[0][0]
    judged = duration_s / 2 >= min_half_s and pct is not None
    return {**out, "second_half_samples": n, "second_half_span_s": round(span, 1),
            "second_half_rss_mb": [round(min(r for _, r in half), 1), round(max(r for _, r in half), 1)],
            "slope_mb_per_10min": round(per_10, 1), "slope_pct_per_10min": None if pct is None else round(pct, 2),
            "slope_ok": (pct <= max_pct) if judged else None}


class Poster(HttpScorer):
    async def post(self, index: int) -> int:
        status, _ = await self._request("POST", self.url, self.bodies[index % len(self.bodies)])
        return status


async def sample_server(scorer: Poster, pid: int, windows: list[Window], start: float, window_s: float,
                        stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter() - start
        w = windows[min(len(windows) - 1, int(t / window_s))]
        rss = rss_mb(pid)
        if rss is not None:
            w.rss_mb.append(rss)
            w.rss_t.append(t)
        try:
            w.depth.append(queue_depth(await scorer.get_text("/metrics")))
        except Exception as exc:  # noqa: BLE001 - a missed sample is not a failure of the server
            log(f"queue-depth sample missed: {type(exc).__name__}")
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            pass


async def open_loop(scorer: Poster, rate: float, args: argparse.Namespace, pid: int) -> list[Window]:
    """Send at `rate` requests/s on a fixed schedule for args.duration seconds; every answer is awaited."""
    n_windows = max(1, round(args.duration / args.window))
    windows = [Window(i) for i in range(n_windows)]
    tasks: set[asyncio.Task] = set()
    stop = asyncio.Event()
    start = time.perf_counter()
    sampler = asyncio.create_task(sample_server(scorer, pid, windows, start, args.window, stop))

    async def one(i: int, w: Window) -> None:
        sent = time.perf_counter()
        try:
            status = await asyncio.wait_for(scorer.post(i), args.request_timeout)
        except Exception as exc:  # noqa: BLE001 - timeouts and connection errors are counted
            w.failures += 1
            w.samples.append(type(exc).__name__)
            return
        ms = (time.perf_counter() - sent) * 1000.0
        if status == 200:
            w.ok += 1
            w.ok_ms.append(ms)
        elif status == 429:
            w.overloaded += 1
            w.refused_ms.append(ms)
        else:
            w.server_errors += status >= 500
            w.failures += status < 500
            w.samples.append(f"HTTP {status}")

    i = 0
    while (due := start + i / rate) < start + args.duration:
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        w = windows[min(n_windows - 1, int((due - start) / args.window))]
        if len(tasks) >= args.max_in_flight:
            w.skipped += 1
        else:
            w.sent += 1
            task = asyncio.create_task(one(i, w))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        i += 1
    if tasks:
        await asyncio.wait(set(tasks))
    stop.set()
    await sampler
    return windows


# ---- the run --------------------------------------------------------------------------------------------
async def probe(scorer: Poster) -> list[float]:
    status, body = await scorer._request("POST", scorer.url, scorer.bodies[0])
    if status != 200:
        raise RuntimeError(f"probe answered HTTP {status}")
    return [s["reward"] for s in json.loads(body)["scores"]]


async def soak(args: argparse.Namespace, spec: str, bodies: list[bytes], tokens: list[int], log_dir: Path) -> dict:
    port, grpc_port = procs.free_port(), procs.free_port()
    prefix = [sys.executable, "-m", "rewardserve.cli"]
    if args.probe_out:
        prefix = [sys.executable, str(Path(__file__).resolve().parent / "memprobe.py"), "--out", args.probe_out,
                  "--every", str(args.probe_every), "--tracemalloc", str(args.probe_tracemalloc), *(["--trim"] if args.probe_trim else []), "--"]
    argv = [*prefix, "serve", "--model", spec, "--host", "127.0.0.1", "--port", str(port),
            "--grpc-port", str(grpc_port), "--threads", str(args.threads), "--max-queue", str(args.max_queue),
            "--log-level", "warning", *shlex.split(args.server_args)]
    env = dict(item.split("=", 1) for item in args.server_env)
    server = procs.ServerProcess("soak-server", argv, log_dir, env=env)
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        server.start()
        out["startup_s"] = round(await asyncio.to_thread(server.wait_ready, base + "/ready", args.start_timeout), 1)
        log(f"server ready in {out['startup_s']} s (pid {server.pid})")
        async with Poster(base, bodies, args.request_timeout) as scorer:
            listed = json.loads(await scorer.get_text("/v1/models"))["data"][0]
            out["served"] = {k: listed.get(k) for k in ("dtype", "forward", "batch_invariant")}
            before = await probe(scorer)
            cap = await closed_loop(scorer, tokens, args.clients, warmup_s=2.0, duration_s=args.capacity_s)
            out["capacity"] = {"requests_per_s": round(cap.pairs_per_s, 2),
                               "inputs_per_s": round(cap.pairs_per_s * args.inputs_per_request, 1),
                               "p50_ms": cap.percentile_ms(50), "errors": cap.errors, "clients": args.clients}
            rate = args.rate or args.factor * cap.pairs_per_s
            if rate <= 0:
                raise RuntimeError(f"capacity measured as {cap.pairs_per_s} requests/s ({cap.errors} errors): "
                                   "nothing to soak at (pass --rate)")
            log(f"capacity {cap.pairs_per_s:.1f} requests/s ({args.clients} clients); soaking at {rate:.1f}/s "
                f"for {args.duration:g} s")
            out["target_rps"] = round(rate, 2)
            out["rss_mb_start"] = rss_mb(server.pid)
            out["server_allocator"] = server_allocator(server.pid)
            log(f"server allocator: {out['server_allocator']}")
            windows = await open_loop(scorer, rate, args, server.pid)
            out["rss_mb_end"] = rss_mb(server.pid)
            out["windows"] = [w.to_json(args.window) for w in windows]
            for w in out["windows"]:
                log(f"window {w['window']}: {w['ok']} ok, {w['overloaded_429']} 429, {w['5xx']} 5xx, "
                    f"{w['failures']} failed, p50 {w['p50_ms']} ms, p99 {w['p99_ms']} ms, RSS {w['rss_mb_max']} MB")
            await asyncio.sleep(1.0)  # what was queued is answered: the server is idle again
            ready = await scorer._request("GET", base + "/ready")
            out["ready_after"] = ready[0] == 200
            after = await probe(scorer)
            out["probe_max_abs_diff"] = max(abs(a - b) for a, b in zip(before, after))
            ok_ms = [ms for w in windows for ms in w.ok_ms]
            out["latency_ms"] = {"p50": pct(ok_ms, 50), "p99": pct(ok_ms, 99), "max": pct(ok_ms, 100)}
            rss = [r for w in windows for r in w.rss_mb]
            out["rss_mb_max"] = round(max(rss), 1) if rss else None
            out["memory"] = rss_trend([(t, r) for w in windows for t, r in zip(w.rss_t, w.rss_mb)], args.duration,
                                      [w["rss_mb_end"] for w in out["windows"]], out["rss_mb_start"],
                                      args.max_slope_pct, args.slope_min_s)
    finally:
        out["exit_code"] = await asyncio.to_thread(server.stop)
        if out["exit_code"] != 0:
            log(f"server exit code {out['exit_code']}; log tail:\n{server.tail(15)}")
    return out


def table(out: dict[str, Any]) -> str:
    head = f"{'t (s)':>6} {'sent':>6} {'ok':>6} {'429':>6} {'5xx':>4} {'fail':>4} {'p50 ms':>8} {'p99 ms':>8} " \
           f"{'p99 429':>8} {'RSS max':>7} {'RSS end':>7} {'growth':>7} {'depth':>6}"
    growth = out.get("memory", {}).get("growth_mb_per_window") or [None] * len(out.get("windows", []))
    rows = [head] + [
        f"{w['t_end_s']:>6g} {w['sent']:>6} {w['ok']:>6} {w['overloaded_429']:>6} {w['5xx']:>4} {w['failures']:>4} "
        f"{w['p50_ms'] or '-':>8} {w['p99_ms'] or '-':>8} {w['p99_429_ms'] or '-':>8} {w['rss_mb_max'] or '-':>7} "
        f"{w['rss_mb_end'] or '-':>7} {'-' if g is None else f'{g:+.1f}':>7} "
        f"{w['queue_depth_max'] if w['queue_depth_max'] is not None else '-':>6}"
        for w, g in zip(out.get("windows", []), growth)
    ]
    mem = out.get("memory", {})
    if mem.get("slope_mb_per_10min") is not None:
        verdict = {True: "ok", False: "TOO STEEP", None: "not judged: second half too short"}[mem["slope_ok"]]
        rows.append(f"RSS slope over the second half (from {mem['second_half_from_s']:g} s): "
                    f"{mem['slope_mb_per_10min']:+.1f} MB / 10 min ({mem['slope_pct_per_10min']:+.2f} %; limit "
                    f"{mem['max_slope_pct_per_10min']:g} %): {verdict}")
    return "\n".join(rows)


def machine_info() -> dict[str, Any]:
    """CPU model and ISA (service/backends/precision.py), printed beside every figure."""
    from service.backends.precision import machine

    return machine()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    procs.install_cleanup()
    tmp = Path(tempfile.mkdtemp(prefix="rewardserve-soak-"))
    log_dir = Path(args.log_dir) if args.log_dir else tmp
    log_dir.mkdir(parents=True, exist_ok=True)
    spec = model_spec(args, tmp)
    bodies, tokens = request_bodies(spec, args)
    load_start = [round(x, 2) for x in os.getloadavg()]
    try:
        out = asyncio.run(soak(args, spec, bodies, tokens, log_dir))
    except KeyboardInterrupt:
        log("interrupted: server stopped")
        return 130
    finally:
        procs.stop_all()
    totals = {k: sum(w[k] for w in out.get("windows", [])) for k in ("sent", "ok", "overloaded_429", "5xx",
                                                                      "failures", "skipped")}
    passed = bool(out.get("windows")) and totals["5xx"] == 0 and totals["failures"] == 0 and out.get("ready_after") \
        and (out.get("probe_max_abs_diff") or 0.0) <= 1e-5 and out.get("exit_code") == 0 \
        and out.get("memory", {}).get("slope_ok") is not False
    summary = {"bench": "soak", "pass": bool(passed), "model": args.model, "duration_s": args.duration,
               "window_s": args.window, "factor": args.factor, "inputs_per_request": args.inputs_per_request,
               "max_queue": args.max_queue, "threads": args.threads, **out, "totals": totals,
               "loadavg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
               "cores": len(os.sched_getaffinity(0)), "machine": machine_info(), "elapsed_s": round(time.monotonic() - T_START, 1),
               "command": shlex.join(["python", "bench/soak.py", *argv])}
    print(table(out))
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
