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
latency p50/p99 of the answered ones and p99 of the refused ones, the server's RSS (max over 1 s samples) and
queue depth (max over samples). Progress goes to stderr, a table to stdout, and the LAST line of stdout is one
JSON object. Exit 0 when there was no 5xx, no failure, the probe matched and the server exited 0.
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
    depth: list[float] = field(default_factory=list, repr=False)
    samples: list[str] = field(default_factory=list)

    def to_json(self, window_s: float) -> dict[str, Any]:
        return {
            "window": self.index, "t_end_s": round((self.index + 1) * window_s, 1), "sent": self.sent,
            "ok": self.ok, "overloaded_429": self.overloaded, "5xx": self.server_errors, "failures": self.failures,
            "skipped": self.skipped, "ok_per_s": round(self.ok / window_s, 2),
            "p50_ms": pct(self.ok_ms, 50), "p99_ms": pct(self.ok_ms, 99), "p99_429_ms": pct(self.refused_ms, 99),
            "rss_mb_max": round(max(self.rss_mb), 1) if self.rss_mb else None,
            "queue_depth_max": max(self.depth) if self.depth else None, "error_samples": self.samples[:3],
        }


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    data = sorted(values)
    return round(data[min(len(data) - 1, max(0, -(-len(data) * q // 100) - 1))], 1)  # nearest rank


class Poster(HttpScorer):
    async def post(self, index: int) -> int:
        status, _ = await self._request("POST", self.url, self.bodies[index % len(self.bodies)])
        return status


async def sample_server(scorer: Poster, pid: int, windows: list[Window], start: float, window_s: float,
                        stop: asyncio.Event) -> None:
    while not stop.is_set():
        w = windows[min(len(windows) - 1, int((time.perf_counter() - start) / window_s))]
        rss = rss_mb(pid)
        if rss is not None:
            w.rss_mb.append(rss)
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
    argv = [sys.executable, "-m", "rewardserve.cli", "serve", "--model", spec, "--host", "127.0.0.1", "--port", str(port),
            "--grpc-port", str(grpc_port), "--threads", str(args.threads), "--max-queue", str(args.max_queue),
            "--log-level", "warning", *shlex.split(args.server_args)]
    server = procs.ServerProcess("soak-server", argv, log_dir)
    base = f"http://127.0.0.1:{port}"
    out: dict[str, Any] = {}
    try:
        server.start()
        out["startup_s"] = round(await asyncio.to_thread(server.wait_ready, base + "/ready", args.start_timeout), 1)
        log(f"server ready in {out['startup_s']} s (pid {server.pid})")
        async with Poster(base, bodies, args.request_timeout) as scorer:
            before = await probe(scorer)
            cap = await closed_loop(scorer, tokens, args.clients, warmup_s=2.0, duration_s=args.capacity_s)
            out["capacity"] = {"requests_per_s": round(cap.pairs_per_s, 2),
                               "inputs_per_s": round(cap.pairs_per_s * args.inputs_per_request, 1),
                               "p50_ms": cap.percentile_ms(50), "errors": cap.errors, "clients": args.clients}
            rate = args.factor * cap.pairs_per_s
            log(f"capacity {cap.pairs_per_s:.1f} requests/s ({args.clients} clients); soaking at {rate:.1f}/s "
                f"for {args.duration:g} s")
            out["target_rps"] = round(rate, 2)
            out["rss_mb_start"] = rss_mb(server.pid)
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
    finally:
        out["exit_code"] = await asyncio.to_thread(server.stop)
        if out["exit_code"] != 0:
            log(f"server exit code {out['exit_code']}; log tail:\n{server.tail(15)}")
    return out


def table(out: dict[str, Any]) -> str:
    head = f"{'t (s)':>6} {'sent':>6} {'ok':>6} {'429':>6} {'5xx':>4} {'fail':>4} {'p50 ms':>8} {'p99 ms':>8} " \
           f"{'p99 429':>8} {'RSS MB':>7} {'depth':>6}"
    rows = [head] + [
        f"{w['t_end_s']:>6g} {w['sent']:>6} {w['ok']:>6} {w['overloaded_429']:>6} {w['5xx']:>4} {w['failures']:>4} "
        f"{w['p50_ms'] or '-':>8} {w['p99_ms'] or '-':>8} {w['p99_429_ms'] or '-':>8} {w['rss_mb_max'] or '-':>7} "
        f"{w['queue_depth_max'] if w['queue_depth_max'] is not None else '-':>6}"
        for w in out.get("windows", [])
    ]
    return "\n".join(rows)


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
        and (out.get("probe_max_abs_diff") or 0.0) <= 1e-5 and out.get("exit_code") == 0
    summary = {"bench": "soak", "pass": bool(passed), "model": args.model, "duration_s": args.duration,
               "window_s": args.window, "factor": args.factor, "inputs_per_request": args.inputs_per_request,
               "max_queue": args.max_queue, "threads": args.threads, **out, "totals": totals,
               "loadavg": {"start": load_start, "end": [round(x, 2) for x in os.getloadavg()]},
               "cores": len(os.sched_getaffinity(0)), "elapsed_s": round(time.monotonic() - T_START, 1),
               "command": shlex.join(["python", "bench/soak.py", *argv])}
    print(table(out))
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
