"""Mean reward of a policy's sampled responses on a prompt set: compare a policy before and after PPO or DPO on
the same prompts, the same sampling seed and the same reward model (one JSON line out).

    python -m training.policy_eval --policy runs/ppo --prompts prompts.jsonl --reward-model runs/rm --seed 0
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch


def evaluate_policy(policy: str, prompts: str, reward_model: str | None, reward_url: str | None, samples: int,
                    max_new_tokens: int, max_prompt_length: int, temperature: float, batch_size: int, seed: int) -> dict:
    from training.policy import load_policy
    from training.prompts import load_prompts, tokenize_prompts
    from training.rewards import make_scorer
    from training.rollout import HFGenerator, Sampling

    model, tokenizer, _ = load_policy(policy)
    model.eval()
    items = tokenize_prompts(tokenizer, load_prompts(prompts), max_prompt_length) * samples
    generator = HFGenerator(tokenizer, Sampling(max_new_tokens, temperature))
    scorer = make_scorer(reward_model, reward_url, 120.0, 3, None)
    torch.manual_seed(seed)
    rewards, lengths, ended = [], [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        rollouts = generator.generate(model, [i.ids for i in chunk])
        texts = [tokenizer.decode(r.response, skip_special_tokens=True).strip() for r in rollouts]
        inputs = [{"messages": [*i.messages, {"role": "assistant", "content": t}]} for i, t in zip(chunk, texts)]
        rewards += scorer.score(inputs, start // batch_size)
        lengths += [len(r.response) for r in rollouts]
        ended += [r.ended for r in rollouts]
    scorer.close()
    return {
        "policy": policy, "rollouts": len(rewards), "reward_mean": statistics.fmean(rewards),
        "reward_sem": statistics.stdev(rewards) / math.sqrt(len(rewards)) if len(rewards) > 1 else 0.0,
        "response_length": statistics.fmean(lengths), "eos_fraction": statistics.fmean(ended), "seed": seed,
        "rewards": rewards,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.policy_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="smollm2 | a causal-LM checkpoint folder")
    parser.add_argument("--prompts", required=True)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--reward-model")
    group.add_argument("--reward-url")
    parser.add_argument("--samples", type=int, default=1, help="responses per prompt")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-prompt-length", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_policy(args.policy, args.prompts, args.reward_model, args.reward_url, args.samples,
                             args.max_new_tokens, args.max_prompt_length, args.temperature, args.batch_size, args.seed)
    print(json.dumps({k: v for k, v in result.items() if k != "rewards"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
