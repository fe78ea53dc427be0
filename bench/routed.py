"""What routing by the prompt costs: the shipped `ensemble` (a gate that reads each prompt) against one of its
heads alone, on the same requests, in one process.

The shipped overlay models/ensemble is served as the server serves it (service.house.ModelHouse, --dtype as given):
`ensemble/L30` is one head of the pass (one that reads the last layer); `ensemble` reads all fourteen heads (at six
layers) on the inputs and, besides, the gate head on each request's distinct prompt with the response emptied (one
more short sequence per prompt). Workload:
the first --pairs pairs of each set, one request per pair (its two answers; one prompt), all requests in flight at
once, as a trainer's scoring burst sends them; timed --repeats times after a warm-up, the best kept.

    python bench/routed.py [--pairs 64] [--dtype auto] [--repeats 2]

Reported per set: seconds for the head alone and for the routed ensemble, their ratio, the input tokens and the gate's
prompt tokens (what routing adds), and the share of requests routed to the harmless head. Prints the machine first and one JSON object last.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import asyncio  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Sequence  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SETS = {"harmless_dev": "../shared/data/hh_harmless/dev.jsonl.gz", "helpful_dev": "../shared/data/helpful/dev.jsonl.gz"}


def requests_of(path: str, pairs: int) -> list[list[dict[str, Any]]]:
    from training.data import load_preferences, read_records

    return [[p.chosen_input(), p.rejected_input()] for p in load_preferences(read_records(path))[:pairs]]


async def burst(house: Any, model: str, requests: list[list[dict[str, Any]]]) -> tuple[float, int, list[Any]]:
    t0 = time.perf_counter()
    outcomes = await asyncio.gather(*(house.score(r, model=model) for r in requests))
    seconds = time.perf_counter() - t0
    tokens = sum(s.tokens for o in outcomes for s in o.results)
    return seconds, tokens, outcomes


async def run(args: argparse.Namespace) -> dict[str, Any]:
    from rewardmodel.rendering import encode_input, prompt_only
    from service.config import ServeConfig
    from service.house import ModelHouse

    config = ServeConfig(models=[{"name": "ensemble", "path": "ensemble"}], dtype=args.dtype, port=0, grpc_port=-1,
                         log_level="warning")
    house = await asyncio.to_thread(ModelHouse.build, config)
    await house.start()
    try:
        gate = house.resolve("ensemble").gate
        out: dict[str, Any] = {"dtype": house.engine.describe().get("dtype"), "sets": {}}
        for name, path in SETS.items():
            requests = requests_of(path, args.pairs)
            prompts = len({json.dumps(r[0]["messages"][:-1]) for r in requests})
            tokenizer = house.resolve("ensemble").tokenizer
            gate_tokens = sum(len(encode_input(tokenizer, prompt_only(r[0]), house.engine.max_length).input_ids)
                              for r in requests)  # one prompt per request
            row: dict[str, Any] = {"pairs": len(requests), "distinct_prompts": prompts,
                                   "gate_prompt_tokens": gate_tokens}
            for label, model in (("head", "ensemble/L30"), ("routed", "ensemble")):
                await burst(house, model, requests)  # warm-up
                best = float("inf")
                for _ in range(args.repeats):
                    seconds, tokens, outcomes = await burst(house, model, requests)
                    best = min(best, seconds)
                row[f"{label}_seconds"] = round(best, 3)
                row[f"{label}_input_tokens"] = tokens
                if label == "routed":
                    key = gate.model.name + "@prompt"
                    routed = [o.results[0].members[key] > gate.threshold for o in outcomes]
                    row["requests_routed"] = round(sum(routed) / len(routed), 3)
            row["routed_vs_head"] = round(row["routed_seconds"] / row["head_seconds"], 3)
            out["sets"][name] = row
            print(f"{name}: head {row['head_seconds']:.2f} s, routed {row['routed_seconds']:.2f} s "
                  f"({row['routed_vs_head']:.2f}x), {row['requests_routed']:.0%} of requests routed", flush=True)
        return out
    finally:
        await house.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=64)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args(argv)
    from service.backends.precision import machine

    info = machine()
    print(f"machine: {json.dumps(info)}", flush=True)
    result = asyncio.run(run(args))
    print(json.dumps({"bench": "routed", "pairs": args.pairs, "machine": info, **result}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
