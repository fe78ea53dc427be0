"""Serving benchmark: rewardserve (HTTP and gRPC) against the raw forward and two naive servers, one machine.

    python bench/serve.py                 # fp32 + bf16, 1/8/32 clients, 20 s windows (~20-35 min on 2 cores)
    python bench/serve.py --quick         # smoke run, < 3 min on 2 cores (see README for what it trims)
    python bench/serve.py --server-args="--max-batch-size 16 --max-wait-ms 5" --json-out runs/b16.json

Per dtype: raw forward (in this process, before any server) -> rewardserve subprocess (HTTP runs, then gRPC runs
at each concurrency) -> naive-async subprocess -> naive-threadpool subprocess. One server at a time. Tables go
to stdout, progress to stderr, and the LAST line of stdout is one JSON object (see bench/README.md).
Exit code: 0 when everything ran with zero request errors, 1 otherwise.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (the raw forward runs here)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs, report  # noqa: E402
from bench.loadgen import GrpcScorer, HttpScorer, RunResult, closed_loop, http_bodies  # noqa: E402

T_START = time.monotonic()
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # JSON key -> torch dtype / --dtype value
ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
OWNED_SERVER_FLAGS = ("--model", "--dtype", "--host", "--port", "--grpc-port", "--log-level")
METRICS = ("rewardserve_batch_size_sum", "rewardserve_batch_size_count", "rewardserve_padding_ratio_sum",
           "rewardserve_batch_compute_seconds_sum", "rewardserve_queue_wait_seconds_sum",
           "rewardserve_queue_wait_seconds_count")
QUICK = {"dtypes": "fp32", "concurrency": "1,32", "duration": 4.0, "warmup": 1.0, "pairs": 48,
         "raw_batch_sizes": "1,8", "min_answers": 2.0, "max_window": 8.0}
FULL = {"dtypes": "fp32,bf16", "concurrency": "1,8,32", "duration": 20.0, "warmup": 3.0, "pairs": 256,
        "raw_batch_sizes": "1,2,4,8,16,32", "min_answers": 3.0}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="minilm", help="any spec rewardmodel.modeling.resolve_model takes")
    p.add_argument("--dtypes", help=f"comma list of fp32,bf16 (default {FULL['dtypes']}; quick {QUICK['dtypes']})")
    p.add_argument("--concurrency", help=f"client counts (default {FULL['concurrency']}; quick {QUICK['concurrency']})")
    p.add_argument("--duration", type=float, help=f"measured window, s (default {FULL['duration']:g}; quick {QUICK['duration']:g})")
    p.add_argument("--warmup", type=float, help=f"minimum warm-up per run, s (default {FULL['warmup']:g}; quick {QUICK['warmup']:g})")
    p.add_argument("--raw-duration", type=float, help="seconds per raw batch size (default: --duration; at least one pass)")
    p.add_argument("--max-requests", type=int, default=0, help="end a window early after this many answers (0: off)")
    p.add_argument("--min-answers", type=float,
                   help=f"lengthen a window (up to --max-window) to hold about this many answers per client "
                        f"(default {FULL['min_answers']:g}; quick {QUICK['min_answers']:g}; 0: fixed windows)")
    p.add_argument("--max-window", type=float, help="longest window, s (default 3x --duration; quick 8)")
    p.add_argument("--pairs", type=int, help=f"workload size (default {FULL['pairs']}; quick {QUICK['pairs']})")
    p.add_argument("--min-tokens", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--raw-batch-sizes", help=f"default {FULL['raw_batch_sizes']}; quick {QUICK['raw_batch_sizes']}")
    p.add_argument("--raw-packed", action="store_true",
                   help="also sweep rewardserve's packed (padding-free) forward offline: the server's compute ceiling")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads of every system (default: all available cores)")
    p.add_argument("--systems", default="raw,rewardserve,naive-async,naive-threadpool",
                   help="subset to run (comma list); ratios need raw, rewardserve and a naive one")
    p.add_argument("--server-args", default="",
                   help="extra `rewardserve serve` flags, as one string: --server-args=\"--max-batch-size 16 --packing off\"")
    p.add_argument("--quick", action="store_true", help="smoke run under 3 minutes (fewer everything)")
    p.add_argument("--json-out", help="also write the result JSON (indented) to this file")
    p.add_argument("--data", default=None, help="HH jsonl.gz for the texts (default ../shared/data/hh_harmless/dev.jsonl.gz)")
    p.add_argument("--start-timeout", type=float, default=300.0, help="seconds a server may take to be ready")
    p.add_argument("--request-timeout", type=float, default=120.0, help="per-request timeout, s (counted as an error)")
    p.add_argument("--check-pairs", type=int, default=4, help="pairs whose rewards are compared with the raw forward")
    p.add_argument("--log-dir", help="keep server logs here (default: a temp dir, removed after a clean run)")
    args = p.parse_args(argv)
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    names = [ALIASES.get(d.strip(), d.strip()) for d in args.dtypes.split(",") if d.strip()]
    args.dtype_list = list(dict.fromkeys(names))  # fp32,bf16 order kept, duplicates dropped
    unknown = [d for d in args.dtype_list if d not in DTYPES]
    if unknown:
        p.error(f"unknown dtype(s) {unknown}; use fp32, bf16 (or fp16)")
    args.conc = sorted({int(c) for c in args.concurrency.split(",")})
    args.raw_bs = [int(b) for b in args.raw_batch_sizes.split(",")]
    args.server_argv = shlex.split(args.server_args)
    owned = [a for a in args.server_argv if a.split("=")[0] in OWNED_SERVER_FLAGS]
    if owned:
        p.error(f"--server-args may not set {owned}: the bench sets model, dtype, host, ports and log level")
    threads_parser = argparse.ArgumentParser(add_help=False)
    threads_parser.add_argument("--threads", type=int)
    server_threads = threads_parser.parse_known_args(args.server_argv)[0].threads
    args.server_sets_threads = server_threads is not None
    if server_threads is not None:  # every system runs with the thread count rewardserve gets
        args.threads = server_threads
    if args.max_window is None:
        args.max_window = 3 * args.duration
    if args.raw_duration is None:
        args.raw_duration = args.duration
    args.system_set = {s.strip() for s in args.systems.split(",")}
    if Path(args.model).expanduser().is_dir():  # the servers run from the repo root: pass them an absolute path
        args.model = str(Path(args.model).expanduser().resolve())
    if min(args.conc) < 1 or args.duration <= 0:
        p.error("--concurrency values must be >= 1 and --duration > 0")
    return args


# ---- one server: start, check, measure, stop --------------------------------------------------------------
def metric_sums(text: str) -> dict[str, float]:
    sums = dict.fromkeys(METRICS, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in sums:
            sums[name] += float(line.rsplit(" ", 1)[1])
    return sums


def metric_extra(before: dict[str, float], after: dict[str, float], window_s: float) -> dict[str, Any]:
    d = {k: after[k] - before[k] for k in METRICS}
    batches = d["rewardserve_batch_size_count"]
    waits = d["rewardserve_queue_wait_seconds_count"]
    return {
        "batches": int(batches),
        "mean_batch_size": round(d["rewardserve_batch_size_sum"] / batches, 3) if batches else None,
        "mean_padding_ratio": round(d["rewardserve_padding_ratio_sum"] / batches, 4) if batches else None,
        "model_busy": round(d["rewardserve_batch_compute_seconds_sum"] / window_s, 3) if window_s else None,
        "mean_queue_wait_ms": round(1000 * d["rewardserve_queue_wait_seconds_sum"] / waits, 2) if waits else None,
    }


async def measure(name: str, scorer: Any, control: HttpScorer, tokens: list[int], args: argparse.Namespace,
                  with_metrics: bool) -> dict[str, dict[str, Any]]:
    runs: dict[str, dict[str, Any]] = {}
    for c in args.conc:
        snaps: dict[str, dict[str, float]] = {}

        async def snap(key: str) -> None:
            if with_metrics:
                snaps[key] = metric_sums(await control.get_text("/metrics"))

        result: RunResult = await closed_loop(
            scorer, tokens, c, warmup_s=args.warmup, duration_s=args.duration, max_requests=args.max_requests,
            min_requests=int(args.min_answers * c), max_window_s=args.max_window,
            warmup_max_s=max(60.0, args.request_timeout), drain_timeout_s=args.request_timeout,
            on_window_start=lambda: snap("before"), on_window_end=lambda: snap("after"),
        )
        if with_metrics and len(snaps) == 2:
            result.extra.update(metric_extra(snaps["before"], snaps["after"], result.window_s))
        runs[str(c)] = result.to_json()
        r = runs[str(c)]
        batch = f", mean batch {r['mean_batch_size']}" if r.get("mean_batch_size") is not None else ""
        log(f"{name} c={c}: {r['pairs_per_s']:.2f} pairs/s, p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, "
            f"{r['ok']} ok, {r['errors']} errors{batch}")
    return runs


async def check_rewards(scorer: Any, n: int, raw: dict[str, Any]) -> float | None:
    """Score the first n pairs one by one; max |reward - raw bs=1 reward| (None without a raw result)."""
    rewards = [await scorer.score(i) for i in range(n)]
    expected = raw.get("check_rewards") or []
    return max((abs(a - b) for a, b in zip(rewards, expected)), default=None)


def server_argv(kind: str, args: argparse.Namespace, dtype: str, port: int, grpc_port: int) -> list[str]:
    if kind == "rewardserve":
        return [sys.executable, "-m", "rewardserve.cli", "serve", "--model", args.model, "--dtype", dtype,
                "--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(grpc_port), "--log-level", "warning",
                *([] if args.server_sets_threads else ["--threads", str(args.threads)]), *args.server_argv]
    mode = kind.split("-", 1)[1]
    return [sys.executable, str(Path(__file__).resolve().parent / "naive_servers.py"), "--mode", mode,
            "--model", args.model, "--dtype", dtype, "--port", str(port), "--threads", str(args.threads)]


async def bench_server(kind: str, args: argparse.Namespace, dtype: str, inputs: list[dict], tokens: list[int],
                       raw: dict[str, Any], log_dir: Path) -> dict[str, dict[str, Any]]:
    """Results keyed by system name: rewardserve gives -http and -grpc, a naive server gives itself."""
    port, grpc_port = procs.free_port(), procs.free_port()
    server = procs.ServerProcess(f"{kind}-{dtype}", server_argv(kind, args, dtype, port, grpc_port), log_dir)
    base = f"http://127.0.0.1:{port}"
    names = ["rewardserve-http", "rewardserve-grpc"] if kind == "rewardserve" else [kind]
    out: dict[str, dict[str, Any]] = {n: {} for n in names}
    try:
        log(f"starting {server.name}: {' '.join(server.argv[1:])}")
        server.start()
        startup = await asyncio.to_thread(server.wait_ready, base + "/ready", args.start_timeout)
        log(f"{server.name} ready in {startup:.1f} s (pid {server.pid})")
        served = None
        if kind == "rewardserve":  # how the server computes: dtype (auto may pick bf16), forward, invariance
            import httpx

            listed = (await asyncio.to_thread(httpx.get, base + "/v1/models", timeout=30)).json()["data"][0]
            served = {k: listed.get(k) for k in ("dtype", "forward", "batch_invariant")}
        async with HttpScorer(base, http_bodies(inputs), args.request_timeout) as http:
            out[names[0]] = {"startup_s": round(startup, 1), "served": served,
                             "check_max_abs_diff": await check_rewards(http, args.check_pairs, raw)}
            out[names[0]]["runs"] = await measure(f"{dtype} {names[0]}", http, http, tokens, args,
                                                  with_metrics=kind == "rewardserve")
            if kind == "rewardserve":
                try:
                    async with GrpcScorer(f"127.0.0.1:{grpc_port}", inputs, args.request_timeout) as grpc_scorer:
                        out[names[1]] = {"check_max_abs_diff": await check_rewards(grpc_scorer, args.check_pairs, raw)}
                        out[names[1]]["runs"] = await measure(f"{dtype} {names[1]}", grpc_scorer, http, tokens, args,
                                                              with_metrics=True)
                except Exception as exc:  # noqa: BLE001 - gRPC failing must not lose the HTTP numbers
                    out[names[1]] = {"error": f"{type(exc).__name__}: {exc}"}
                    log(f"{names[1]} FAILED: {exc}")
    except Exception as exc:  # noqa: BLE001 - one failing system must not lose the others
        for n in names:
            out[n].setdefault("error", f"{type(exc).__name__}: {exc}")
        log(f"{server.name} FAILED: {exc}")
    finally:
        code = await asyncio.to_thread(server.stop)
        out[names[0]]["exit_code"] = code
        if code not in (0, None, -15) and not any("error" in out[n] for n in names):
            log(f"{server.name} exited with code {code}; last lines of its log:\n{server.tail(15)}")
    return out


# ---- the whole run ----------------------------------------------------------------------------------------
def run_raw(args: argparse.Namespace, dtype: str, inputs: list[dict]) -> dict[str, Any]:
    from bench.raw_forward import measure as measure_raw

    try:
        return measure_raw(args.model, dtype, args.threads, inputs, args.raw_bs, args.raw_duration, args.check_pairs,
                           packed=args.raw_packed)
    except Exception as exc:  # noqa: BLE001
        log(f"raw forward FAILED: {exc}")
        return {"error": f"{type(exc).__name__}: {exc}"}


async def bench_dtype(args: argparse.Namespace, name: str, inputs: list[dict], tokens: list[int],
                      log_dir: Path) -> dict[str, Any]:
    dtype = DTYPES[name]
    dres: dict[str, Any] = {"torch_dtype": dtype, "systems": {}}
    dres["raw"] = run_raw(args, dtype, inputs) if "raw" in args.system_set else {"error": "not run (--systems)"}
    for kind in ("rewardserve", "naive-async", "naive-threadpool"):
        if kind in args.system_set:
            dres["systems"].update(await bench_server(kind, args, dtype, inputs, tokens, dres["raw"], log_dir))
    c = 32 if 32 in args.conc else max(args.conc)
    dres.update(report.ratios(dres, c))
    return dres


ISA_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_tile")


def machine_info() -> dict[str, Any]:
    cpu, flags = "unknown", set()
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
        cpu = next(l.split(":", 1)[1].strip() for l in lines if l.startswith("model name"))
        flags = set(next(l.split(":", 1)[1].split() for l in lines if l.startswith("flags")))
    except (OSError, StopIteration):
        pass
    import torch

    return {"cores": len(os.sched_getaffinity(0)), "cpu_count": os.cpu_count(), "cpu": cpu,
            "isa": [f for f in ISA_FLAGS if f in flags],  # bf16 is fast only with avx512_bf16 / amx
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


def build_workload(args: argparse.Namespace) -> tuple[Any, list[dict], list[int], dict[str, Any]]:
    """(model source, inputs, token lengths, length stats); ValueError/FileNotFoundError on bad flags."""
    import transformers

    from bench.workload import DEFAULT_DATA, build_pairs, describe, served_max_length
    from rewardmodel.modeling import load_tokenizer, resolve_model

    transformers.logging.set_verbosity_error()  # the workload builder tokenizes texts longer than the model
    transformers.logging.disable_progress_bar()
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    data = Path(args.data) if args.data else DEFAULT_DATA
    pairs, text_source = build_pairs(tokenizer, served_max_length(source, tokenizer), args.pairs,
                                     args.min_tokens, args.max_tokens, data_path=data)
    args.check_pairs = min(args.check_pairs, len(pairs))
    return source, [p.as_input() for p in pairs], [p.tokens for p in pairs], {**describe(pairs), "source": text_source}


async def main_async(args: argparse.Namespace, workload: tuple, log_dir: Path) -> dict[str, Any]:
    source, inputs, tokens, lengths = workload
    log(f"workload: {lengths}")
    results: dict[str, Any] = {"model": args.model, "model_name": source.name, "model_path": str(source.path),
                               "lengths": lengths, "dtypes": args.dtype_list, "threads": args.threads,
                               "machine": machine_info()}
    if results["machine"]["loadavg_start"][0] > 0.5 * results["machine"]["cores"]:
        log(f"WARNING: load average {results['machine']['loadavg_start']} on {results['machine']['cores']} cores: "
            "other jobs are running, numbers will be noisy")
    if any(DTYPES[d] == "bfloat16" for d in args.dtype_list) and not {"avx512_bf16", "amx_bf16"} & set(results["machine"]["isa"]):
        log(f"NOTE: this CPU has no bf16 instructions (ISA {results['machine']['isa']}): bf16 is emulated and "
            "slower than fp32 here; bf16 runs take long (use --dtypes fp32 to skip them)")
    for name in args.dtype_list:
        results[name] = await bench_dtype(args, name, inputs, tokens, log_dir)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["elapsed_s"] = round(time.monotonic() - T_START, 1)
    return results


def summarize(results: dict[str, Any], args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    head = "fp32" if "fp32" in args.dtype_list else args.dtype_list[0]
    errors, failures = 0, []
    for name in args.dtype_list:
        dres = results[name]
        if "error" in dres["raw"] and "raw" in args.system_set:
            failures.append(f"{name} raw: {dres['raw']['error']}")
        for sys_name, s in dres["systems"].items():
            errors += sum(run["errors"] for run in (s.get("runs") or {}).values())
            if "error" in s:
                failures.append(f"{name} {sys_name}: {s['error'].splitlines()[0]}")
    headline = {k: results[head].get(k) for k in ("server_vs_raw", "server_vs_naive", "grpc_vs_raw", "grpc_vs_naive",
                                                  "idle_latency_vs_forward", "idle_latency_vs_served_forward")}
    served = (results[head]["systems"].get("rewardserve-http") or {}).get("served") or {}
    return {
        **headline,
        "dtype": served.get("dtype"), "forward": served.get("forward"),
        "mean_batch_size_http": results[head].get("mean_batch_size_http"),
        "headline_dtype": head, "ratio_concurrency": results[head].get("ratio_concurrency"),
        **{name: results[name] for name in args.dtype_list},
        **{k: results[k] for k in ("model", "model_name", "model_path", "lengths", "threads", "machine", "elapsed_s")},
        "cores": results["machine"]["cores"],
        "settings": {"quick": args.quick, "dtypes": args.dtype_list, "concurrency": args.conc,
                     "duration_s": args.duration, "warmup_s": args.warmup, "max_requests": args.max_requests,
                     "min_answers_per_client": args.min_answers, "max_window_s": args.max_window,
                     "raw_batch_sizes": args.raw_bs, "raw_duration_s": args.raw_duration,
                     "raw_packed": args.raw_packed, "server_args": args.server_args, "pairs": args.pairs},
        "errors_total": errors, "failures": failures,
        "command": shlex.join(["python", *argv]),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv if argv is None else ["bench/serve.py", *argv]
    args = parse_args(argv[1:])
    try:
        workload = build_workload(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"bench/serve.py: error: {exc}", file=sys.stderr)
        return 2
    procs.install_cleanup()
    log_dir = Path(args.log_dir) if args.log_dir else Path(tempfile.mkdtemp(prefix="rewardserve-bench-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        results = asyncio.run(main_async(args, workload, log_dir))
    except KeyboardInterrupt:
        log("interrupted: servers stopped")
        return 130
    finally:
        procs.stop_all()
    summary = summarize(results, args, argv)
    print(report.render({**summary, "dtypes": args.dtype_list}, args.conc))
    if args.json_out:
        Path(args.json_out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json_out).write_text(json.dumps(summary, indent=2) + "\n")
    clean = summary["errors_total"] == 0 and not summary["failures"]
    if clean and not args.log_dir:
        shutil.rmtree(log_dir, ignore_errors=True)
    elif not clean:
        log(f"server logs kept in {log_dir}; failures: {summary['failures']}, request errors: {summary['errors_total']}")
    print(json.dumps(summary, separators=(",", ":")), flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
