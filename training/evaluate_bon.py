"""Best-of-N evaluation: how the best reward grows with N, against the KL that Best-of-N costs.

For each prompt, M = max(N) candidates are generated ONCE and scored, through the server's own Best-of-N path
(service.bon.BestOfN: the generator, then the engine scoring all M as one request). For every N the expected
best reward of N independent samples is estimated without bias from those M samples: the mean, over all
C(M, N) subsets of size N, of the subset's best reward. With the M rewards sorted ascending
r_(1) <= ... <= r_(M), the subset's best is r_(i) in C(i-1, N-1) of the subsets, so

    E_hat[max of N] = sum_{i=N..M} C(i-1, N-1) / C(M, N) * r_(i)

(N = 1 gives the plain mean; N = M the sample maximum). The KL of the Best-of-N policy from the base policy
is, analytically, log N - (N-1)/N (Stiennon et al. 2020, "Learning to summarize from human feedback",
appendix; Beirami et al. 2024 show it is an upper bound).

report.json:
  curve        per N: kl_bon, best_reward_mean / _std / _sem across prompts, gain over N=1
  rewards      mean and std of all M x prompts rewards; finish reasons; truncated inputs
  per_prompt   the M rewards of each prompt, in sample order (no texts)
bon_curve.png: best reward vs N (log scale) and vs KL, mean with the std band across prompts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections import Counter
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import numpy as np

log = logging.getLogger("rewardserve.eval")

GENERATOR_KINDS = ("vllm", "hf", "openai")


# ---------------------------------------------------------------------------------------------------- maths


def expected_best(rewards: Sequence[float], n: int) -> float:
    """Unbiased estimate of E[max of n iid draws] from m >= n draws: the mean over all n-subsets of their max."""
    r = np.sort(np.asarray(rewards, dtype=np.float64))  # (m,) ascending
    m = len(r)
    if not 1 <= n <= m:
        raise ValueError(f"n must be between 1 and the number of samples ({m}), got {n}")
    total = math.comb(m, n)
    weights = np.array([math.comb(i - 1, n - 1) / total for i in range(n, m + 1)])  # r_(i) for i = n..m (1-based)
    return float(weights @ r[n - 1 :])


def bon_kl(n: int) -> float:
    """KL(Best-of-N policy || base policy) = log N - (N-1)/N, in nats."""
    return math.log(n) - (n - 1) / n


def curve(rewards: np.ndarray, ns: Sequence[int]) -> list[dict[str, float]]:
    """rewards: (P, M). Per N: the per-prompt estimates' mean, std and standard error across the P prompts."""
    prompts = rewards.shape[0]
    base = None
    out = []
    for n in ns:
        best = np.array([expected_best(row, n) for row in rewards])  # (P,)
        mean = float(best.mean())
        base = mean if base is None else base
        out.append({
            "n": int(n), "kl_bon": bon_kl(n), "best_reward_mean": mean, "best_reward_std": float(best.std()),
            "best_reward_sem": float(best.std(ddof=1) / math.sqrt(prompts)) if prompts > 1 else 0.0,
            "gain_over_first": mean - base,
        })
    return out


# ---------------------------------------------------------------------------------------------------- data


def load_prompts(path: str | Path, limit: int | None = None) -> list[list[dict[str, str]]]:
    """Prompts as conversations, in training.prompts' formats: `turns` (MT-Bench: the first turn), `question`
    (GSM8K), `prompt`, `messages` (a trailing assistant message dropped) or a plain string; the first `limit`."""
    from training.prompts import load_prompts as read_prompts  # torch: imported only here

    return read_prompts(str(path))[:limit]


# ---------------------------------------------------------------------------------------------------- running


def generator_spec(policy: str, generator: str) -> str:
    """`--policy smollm2 --generator vllm` -> `vllm:smollm2`; a policy given as a full spec is kept."""
    kind = policy.partition(":")[0]
    return policy if kind in GENERATOR_KINDS and ":" in policy else f"{generator}:{policy}"


async def sample_and_score(bon: Any, prompts: list[list[dict]], m: int, sampling: dict, concurrency: int) -> list:
    """One Best-of-M per prompt (the server's path); outcomes in prompt order."""
    from service.schemas import BestOfNRequest

    gate = asyncio.Semaphore(concurrency)
    seed = sampling.get("seed")

    async def one(i: int, messages: list[dict]) -> Any:
        request = BestOfNRequest(
            messages=messages, n=m, temperature=sampling["temperature"], top_p=sampling["top_p"],
            max_tokens=sampling["max_tokens"], seed=None if seed is None else seed + i * m,
        )
        async with gate:
            outcome = await bon.best_of_n(request)
        log.info("prompt %d/%d: best %.4f", i + 1, len(prompts), outcome.best.reward)
        return outcome

    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


async def _run(spec: str, model: str, prompts: list, m: int, sampling: dict, concurrency: int) -> tuple[Any, list]:
    from service.config import ServeConfig
    from service.house import ModelHouse
    from service.runtime import start_best_of_n

    config = ServeConfig(
        model=model, generator=spec, warmup=False, grpc_port=-1, max_n=m, max_new_tokens=sampling["max_tokens"],
        max_inputs_per_request=max(m, 1024), generation_timeout_s=3600.0, log_level="warning",
    )
    house = await asyncio.to_thread(ModelHouse.build, config)
    await house.start()
    bon = None
    try:
        bon = await start_best_of_n(house, config)
        outcomes = await sample_and_score(bon, prompts, m, sampling, concurrency)
        return {"model": house.default, "generator": bon.generator.name}, outcomes
    finally:
        await house.stop()
        if bon is not None and bon.generator is not None:
            await asyncio.to_thread(bon.generator.close)


def build_report(outcomes: list, ns: Sequence[int], info: dict) -> dict:
    by_sample = [sorted(o.candidates, key=lambda c: c.index) for o in outcomes]
    rewards = np.array([[c.reward for c in cands] for cands in by_sample])  # (P, M)
    reasons = Counter(c.finish_reason for cands in by_sample for c in cands)
    return {
        **info, "prompts": int(rewards.shape[0]), "samples_per_prompt": int(rewards.shape[1]),
        "estimator": "unbiased: mean over all N-subsets of the M samples of the subset's best reward",
        "curve": curve(rewards, ns),
        "rewards": {"mean": float(rewards.mean()), "std": float(rewards.std()),
                    "finish_reasons": dict(reasons), "truncated": sum(c.truncated for cs in by_sample for c in cs)},
        "per_prompt": [[float(r) for r in row] for row in rewards],
    }


def write_plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = report["curve"]
    ns = np.array([p["n"] for p in points])
    kl = np.array([p["kl_bon"] for p in points])
    mean = np.array([p["best_reward_mean"] for p in points])
    std = np.array([p["best_reward_std"] for p in points])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, x, label in ((axes[0], ns, "N (candidates)"), (axes[1], kl, "KL(BoN || policy) = log N - (N-1)/N [nats]")):
        ax.plot(x, mean, marker="o")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, label="± std across prompts")
        ax.set_xlabel(label)
        ax.set_ylabel("expected best reward")
        ax.grid(alpha=0.3)
    axes[0].set_xscale("log", base=2)
    axes[0].legend()
    fig.suptitle(f"Best-of-N: {report['generator']} scored by {report['model']} ({report['prompts']} prompts)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def eval_bon(policy: str, prompts_file: str, ns: Sequence[int], report_dir: str, *, model: str = "default",
             generator: str = "vllm", max_tokens: int = 128, temperature: float = 1.0, top_p: float = 1.0,
             seed: int | None = 0, limit: int | None = None, concurrency: int = 4) -> dict:
    ns = sorted({int(n) for n in ns})
    if not ns or ns[0] < 1:
        raise ValueError(f"--n takes positive integers, got {ns}")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1, got {limit}")
    prompts = load_prompts(prompts_file, limit)
    sampling = {"temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
    spec = generator_spec(policy, generator)
    start = time.monotonic()
    info, outcomes = asyncio.run(_run(spec, model, prompts, ns[-1], sampling, concurrency))
    report = build_report(outcomes, ns, {**info, "policy": policy, "prompts_file": str(prompts_file),
                                         "sampling": sampling})
    report["elapsed_s"] = round(time.monotonic() - start, 2)
    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_plot(report, out / "bon_curve.png")
    return report


def main(args: Any) -> int:
    ns = [int(part) for part in str(args.n).split(",") if part.strip()]
    report = eval_bon(
        args.policy, args.prompts, ns, args.report, model=args.model, generator=args.generator,
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
        limit=args.limit, concurrency=args.concurrency,
    )
    for point in report["curve"]:
        print(f"N={point['n']:>3}  KL={point['kl_bon']:.3f}  best reward {point['best_reward_mean']:+.4f} "
              f"± {point['best_reward_std']:.4f}")
    print(json.dumps({"report": str(Path(args.report) / "report.json"), "prompts": report["prompts"],
                      "samples_per_prompt": report["samples_per_prompt"]}))
    return 0
