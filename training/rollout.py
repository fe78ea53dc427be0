"""Rollout generators for PPO: transformers `generate` on the policy itself, or vLLM in this process.

Both sample with the run's torch RNG (vLLM: one seed per request drawn from it), so a resumed run samples exactly
what an uninterrupted one did. vLLM holds its own copy of the weights; `sync(policy)` loads the current policy
(LoRA merged) into it before each rollout, through `LLM.collective_rpc("reload_weights", weights_iterator=...)` (the
worker's in-place layerwise reload, vLLM 0.32), which runs in this process when VLLM_ENABLE_V1_MULTIPROCESSING=0
(set here), so the tensors are handed over without copies through a socket.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from training.prompts import pad_left

log = logging.getLogger("rewardserve.train.rollout")


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0


@dataclass
class Rollout:
    response: list[int]  # sampled ids, up to and including EOS when one was sampled
    ended: bool  # True when the response ends with EOS (False: cut at max_new_tokens)
    logps: list[float] | None = None  # the generator's own log-probs of the response (vLLM), to check the sync


def cut_at_eos(ids: Sequence[int], eos_ids: set[int]) -> Rollout:
    for i, token in enumerate(ids):
        if token in eos_ids:
            return Rollout(list(ids[: i + 1]), True)
    return Rollout(list(ids), False)


class HFGenerator:
    """Sampling with transformers `generate` on the (unwrapped) policy."""

    def __init__(self, tokenizer: Any, sampling: Sampling):
        from transformers import GenerationConfig

        self.eos_ids = {int(tokenizer.eos_token_id)}
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad)
        self.config = GenerationConfig(  # a fresh config: nothing from the checkpoint (repetition penalty, ...) leaks in
            do_sample=True, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
            max_new_tokens=sampling.max_new_tokens, eos_token_id=sorted(self.eos_ids), pad_token_id=self.pad_id,
        )

    def sync(self, policy: Any) -> None:
        pass  # generates with the policy itself

    @torch.no_grad()
    def generate(self, policy: Any, prompts: Sequence[Sequence[int]]) -> list[Rollout]:
        device = next(policy.parameters()).device
        ids, mask = pad_left(prompts, self.pad_id)  # (N, P)
        out = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=self.config)
        return [cut_at_eos(row, self.eos_ids) for row in out[:, ids.shape[1] :].tolist()]  # (N, <= max_new_tokens)

    def close(self) -> None:
        pass


def merged_weights(policy: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) of the policy as a plain checkpoint names them: LoRA deltas merged in, adapter tensors left out."""
    deltas: dict[str, torch.Tensor] = {}
    for name, module in policy.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):  # a peft LoRA layer
            for adapter in getattr(module, "active_adapters", []):
                key = f"{name}.weight"
                deltas[key] = deltas.get(key, 0) + module.get_delta_weight(adapter).detach()
    out = []
    for name, param in policy.named_parameters():
        if "lora_" in name:
            continue
        clean = name.replace(".base_layer.", ".")
        value = param.detach()
        out.append((clean, value + deltas[clean] if clean in deltas else value))
    return out


class VllmGenerator:
    """vLLM's LLM engine in this process (enforce_eager; a CPU build works), started from a saved copy of the
    initial policy and synced with the trained weights before every rollout."""

    def __init__(self, model_dir: Path, sampling: Sampling, eos_ids: set[int], seed: int, max_model_len: int,
                 dtype: str = "float32"):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine lives here: apply_model reaches its weights
        from vllm import LLM
        from vllm.platforms import current_platform

        from service.generation.vllm_settings import engine_kwargs, explain_start_failure

        threads = torch.get_num_threads()
        memory = engine_kwargs(current_platform.is_cpu())  # an explicit KV cache on CPU (1 GiB, or the env's)
        try:
            self.llm = LLM(model=str(model_dir), enforce_eager=True, dtype=dtype, seed=seed,
                           max_model_len=max_model_len, enable_prefix_caching=False,
                           logprobs_mode="processed_logprobs", **memory)  # logprobs after temperature
        except Exception as exc:
            raise explain_start_failure(exc) from exc
        torch.set_num_threads(threads)  # vLLM's CPU worker sets its own; training keeps the run's
        self.sampling, self.eos_ids = sampling, eos_ids

    def sync(self, policy: torch.nn.Module) -> None:
        """Load the policy's current weights into vLLM's model, in place (its layerwise reload: a plain
        load_weights fails once the CPU kernels have repacked the weights)."""
        weights = merged_weights(policy)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        self.llm.apply_model(_repack_lm_head)
        self.llm.reset_prefix_cache()


    def generate(self, policy: Any, prompts: Sequence[Sequence[int]]) -> list[Rollout]:
        from vllm import SamplingParams

        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()  # from the run's RNG: exact on resume
        params = [SamplingParams(n=1, temperature=self.sampling.temperature, top_k=self.sampling.top_k or -1,
                                 top_p=self.sampling.top_p, max_tokens=self.sampling.max_new_tokens, seed=s,
                                 stop_token_ids=sorted(self.eos_ids), logprobs=0) for s in seeds]
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False)
        return [self._rollout(o.outputs[0]) for o in outputs]

    def _rollout(self, out: Any) -> Rollout:
        ids = list(out.token_ids)
        logps = [entry[token].logprob for entry, token in zip(out.logprobs or [], ids)]
        rollout = cut_at_eos(ids, self.eos_ids)
        if out.finish_reason == "stop" and not rollout.ended:  # stopped by EOS without returning it
            rollout = Rollout([*ids, min(self.eos_ids)], True)
        rollout.logps = logps[: len(rollout.response)] if len(logps) >= len(ids) else None
        return rollout

    def logprobs(self, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]]) -> list[list[float]]:
        """vLLM's log-probs of given responses (prompt_logprobs on prompt + response): for checking a sync."""
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=self.sampling.temperature)
        rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
        outputs = self.llm.generate([{"prompt_token_ids": row} for row in rows], params, use_tqdm=False)
        out = []
        for o, p, row in zip(outputs, prompts, rows):
            picked = o.prompt_logprobs[len(p) :]  # one dict per response token: {token id: Logprob}
            out.append([entry[token].logprob for entry, token in zip(picked, row[len(p) :])])
        return out

    def close(self) -> None:
        del self.llm


def _repack_lm_head(model: Any) -> None:
    """vLLM's CPU GEMM works on a packed copy of each weight, made after loading. The layerwise reload re-packs the
    layers it loads, but a tied LM head (SmolLM2's) shares the embedding's weight and keeps its stale packed copy:
    re-pack it from the reloaded weight."""
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if method is not None and getattr(head, "weight", None) is not None and head.weight.numel():
        method.process_weights_after_loading(head)
