"""Answer accuracy of a policy on prompts with reference answers (GSM8K `#### N`, or "reference"): compare a policy
before and after GRPO on a held-out split (one JSON line out).

    python -m training.grpo_eval --policy runs/grpo --prompts heldout.jsonl --max-new-tokens 32

Greedy decoding by default (`--samples K --temperature T` samples K completions per prompt instead). The standard
error is that of the mean over prompts of each prompt's accuracy (prompts are the independent units).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys

import torch


@torch.no_grad()
def _complete(model, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float) -> list:
    from transformers import GenerationConfig

    from training.prompts import pad_left
    from training.rollout import cut_at_eos

    eos = int(tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    sampled = temperature > 0
    config = GenerationConfig(do_sample=sampled, temperature=temperature if sampled else None, top_k=0 if sampled else None,
                              top_p=1.0 if sampled else None, max_new_tokens=max_new_tokens, eos_token_id=[eos],
                              pad_token_id=int(pad))
    ids, mask = pad_left(prompts, int(pad))
    out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [cut_at_eos(row, {eos}) for row in out[:, ids.shape[1] :].tolist()]


def evaluate_accuracy(policy: str, prompts: str, samples: int, max_new_tokens: int, max_prompt_length: int,
                      temperature: float, batch_size: int, seed: int, format_pattern: str | None = None) -> dict:
    from rewardmodel.rules import answer_match, format_match
    from training.grpo import load_grpo_prompts
    from training.policy import load_policy, prompt_ids

    model, tokenizer, _ = load_policy(policy)
    model.eval()
    records = load_grpo_prompts(prompts)
    if any(ref is None for _, ref in records):
        raise ValueError(f"{prompts}: every prompt needs a reference answer ('answer' or 'reference')")
    samples = samples if temperature > 0 else 1
    jobs = [(i, prompt_ids(tokenizer, m, max_prompt_length)) for i, (m, _) in enumerate(records) for _ in range(samples)]
    torch.manual_seed(seed)
    correct: list[list[float]] = [[] for _ in records]
    formatted, lengths, ended = [], [], []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        for (i, _), r in zip(chunk, _complete(model, tokenizer, [ids for _, ids in chunk], max_new_tokens, temperature)):
            text = tokenizer.decode(r.response, skip_special_tokens=True).strip()
            correct[i].append(answer_match(text, records[i][1]))
            if format_pattern:
                formatted.append(format_match(text, format_pattern))
            lengths.append(len(r.response))
            ended.append(r.ended)
    per_prompt = [statistics.fmean(c) for c in correct]
    out = {"policy": policy, "prompts": len(records), "samples": samples, "accuracy": statistics.fmean(per_prompt),
           "accuracy_sem": statistics.stdev(per_prompt) / math.sqrt(len(per_prompt)) if len(per_prompt) > 1 else 0.0,
           "response_length": statistics.fmean(lengths), "eos_fraction": statistics.fmean(ended),
           "temperature": temperature, "seed": seed}
    if format_pattern:
        out["format"] = statistics.fmean(formatted)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.grpo_eval", description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="smollm2 | a causal-LM checkpoint folder")
    parser.add_argument("--prompts", required=True, help="JSONL prompts with 'answer' (GSM8K) or 'reference'")
    parser.add_argument("--samples", type=int, default=1, help="completions per prompt when sampling")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--format-pattern", help="also report the share of completions matching this regex")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = evaluate_accuracy(args.policy, args.prompts, args.samples, args.max_new_tokens, args.max_prompt_length,
                               args.temperature, args.batch_size, args.seed, args.format_pattern)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
