"""What extra score heads over one backbone cost: K = 1, 2, 4, 8 heads in one pass, and two separate models.

Each configuration runs in its own process (so memory is its own): the default model's base (SmolLM2-135M) loaded
as the server loads it (service.backends.hf_backend.HFBackend, --dtype as given), scoring the same inputs (the
first --inputs HH harmless dev inputs, packed batches of at most 4,096 tokens) once to warm up and --repeats times
timed (the best kept). Heads: a K-head overlay written to a temporary folder (row 0 is models/default's head,
the others seeded random rows), served as one backbone whose pass reads all K columns. "two models": two
backbones (two HFBackends over models/default), each input scored by both, as a server with two unrelated models
would. "layers": one head per layer of --layers (an overlay's `head_layers`, as `train rm --read-layers` writes:
the read rows kept after each of those layers and put through the final norm), in the same one pass; its head 0
reads the last layer. Reported per configuration: seconds, ratio to K = 1, RSS after loading and peak RSS (MB), and
whether head 0's rewards are bit-identical to K = 1's (a head's column is computed alone).

    python bench/heads.py [--dtype auto] [--inputs 48] [--heads 1,2,4,8] [--layers 30,8,12,16,20,24]

The issue's goal: a head costs <= 2% time and <= 1% memory. Prints the machine first and one JSON object last.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_overlay(out: Path, k: int, layers: Sequence[int] | None = None) -> Path:
    """models/default with k score rows: row 0 its own, the rest seeded random rows of the same scale; layers: the
    layer each row reads."""
    import torch
    from safetensors.torch import load_file, save_file

    from rewardmodel.modeling import OVERLAY_META, OVERLAY_TENSORS, default_model_dir

    src = default_model_dir()
    out.mkdir(parents=True)
    row = load_file(str(src / OVERLAY_TENSORS))["score.weight"].float()  # (1, H)
    gen = torch.Generator().manual_seed(k)
    rows = torch.cat([row, torch.randn(k - 1, row.shape[1], generator=gen) * row.std()]) if k > 1 else row
    save_file({"score.weight": rows.contiguous()}, str(out / OVERLAY_TENSORS))
    meta = json.loads((src / OVERLAY_META).read_text())
    if k > 1:
        meta["heads"] = [f"h{i}" for i in range(k)]
    if layers:
        meta["head_layers"] = list(layers)
    (out / OVERLAY_META).write_text(json.dumps(meta))
    return out


def one(args: argparse.Namespace) -> dict[str, Any]:
    """Run one configuration in this process."""
    import torch

    from bench.batching import packed_batches
    from rewardmodel.rendering import encode_input
    from service.backends.hf_backend import HFBackend
    from service.config import ServeConfig
    from service.grouping import PlannedBatch
    from training.data import load_preferences, read_records

    torch.set_num_threads(args.threads)
    base = rss_mb()
    with tempfile.TemporaryDirectory(prefix="heads-") as tmp:
        layers = [int(k) for k in args.layers.split(",")] if args.one == "layers" else None
        specs = (["default", "default"] if args.one == "two" else
                 [str(write_overlay(Path(tmp) / "o", len(layers) if layers else int(args.one), layers))])
        backends = [HFBackend(ServeConfig(model=spec, dtype=args.dtype, warmup=False)) for spec in specs]
    loaded = rss_mb()
    pairs = load_preferences(read_records(args.data))
    inputs = [p.chosen_input() for p in pairs][: args.inputs]
    tok = backends[0].tokenizer
    rows = [encode_input(tok, inp, backends[0].max_length).input_ids for inp in inputs]
    plan = packed_batches([len(r) for r in rows], 4096)

    def run() -> list[float]:
        first = [0.0] * len(rows)
        for backend in backends:
            for idx in plan:
                values = backend.outputs(PlannedBatch([rows[i] for i in idx]))
                if backend is backends[0]:
                    for i, v in zip(idx, values):
                        first[i] = float(v[-1, 0])
        return first

    head0 = run()
    best = float("inf")
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return {"config": args.one, "seconds": round(best, 3), "tokens": sum(map(len, rows)), "rss_base_mb": round(base),
            "rss_loaded_mb": round(loaded), "peak_rss_mb": round(peak_mb()),
            "dtype": backends[0].describe()["dtype"], "head0": head0}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--inputs", type=int, default=48)
    p.add_argument("--heads", default="1,2,4,8")
    p.add_argument("--layers", default="30,8,12,16,20,24",
                   help="the 'layers' configuration: one head per layer count, head 0 first ('' to skip it)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--data", default="../shared/data/hh_harmless/dev.jsonl.gz")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one configuration (K or "two") and print JSON
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(one(args)))
        return 0
    from service.backends.precision import machine

    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    results: dict[str, Any] = {}
    for config in [*args.heads.split(","), *(["layers"] if args.layers else []), "two"]:
        cmd = [sys.executable, __file__, "--one", config, "--dtype", args.dtype, "--inputs", str(args.inputs),
               "--repeats", str(args.repeats), "--threads", str(args.threads), "--data", args.data,
               "--layers", args.layers]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            raise SystemExit(f"{config}: failed\n{proc.stderr[-3000:]}")
        results[config] = json.loads(proc.stdout.strip().splitlines()[-1])
        r = results[config]
        label = {"two": "two models", "layers": f"layers {args.layers}"}.get(config, "K=" + config)
        print(f"{label:10s} {r['seconds']:.3f} s  loaded "
              f"{r['rss_loaded_mb']} MB  peak {r['peak_rss_mb']} MB", flush=True)
    one_head = results[args.heads.split(",")[0]]
    summary: dict[str, Any] = {"bench": "heads", "dtype": one_head["dtype"], "tokens": one_head["tokens"],
                               "threads": args.threads, "machine": info, "configs": {}}
    for config, r in results.items():
        summary["configs"][config] = {
            "seconds": r["seconds"], "time_vs_one_head": round(r["seconds"] / one_head["seconds"], 3),
            "rss_loaded_mb": r["rss_loaded_mb"], "peak_rss_mb": r["peak_rss_mb"],
            "memory_vs_one_head": round(r["peak_rss_mb"] / one_head["peak_rss_mb"], 3),
            "head0_same_bits_as_one_head": r["head0"] == one_head["head0"],
        }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
