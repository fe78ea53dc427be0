"""transformers backend: SDPA attention, fp32 or bf16 on CPU, bf16/fp16 on CUDA."""

from __future__ import annotations

import logging
import os
from typing import Any

from service.backends import packing
from rewardmodel.modeling import load_reward_model, load_tokenizer, log_untrained, resolve_model, reward_forward
from rewardmodel.rendering import model_max_length
from service.grouping import BatchResult, PlannedBatch

log = logging.getLogger("rewardserve.hf")

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def available_cores() -> int:
    """Cores this process may run on (CPU affinity / cpuset), not the host's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def pick_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return requested


def pick_dtype(requested: str, device: str) -> Any:
    import torch

    if requested == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, DTYPES[requested])


class HFBackend:
    def __init__(self, config: Any):
        import torch

        self.source = resolve_model(config.model)
        log_untrained(self.source)
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.tokenizer = load_tokenizer(self.source)
        self.model = load_reward_model(self.source, self.dtype, self.device)
        self.name = config.served_name(self.source.name)
        self.max_length = model_max_length(self.tokenizer, self.model.config, config.max_tokens)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.head = packing.head_kind(self.model)
        self.packed = self._want_packing(config.packing)
        if self.packed:
            self.model.set_attn_implementation(packing.register())
        # shared prefixes computed once (tree attention in the packed row): causal decoder heads only
        self.prefix_groups = self.packed and self.head == "decoder"
        log.info(
            "loaded %s (%s) on %s as %s, max_length=%d, threads=%d, packing=%s",
            self.source.path, type(self.model).__name__, self.device, self.dtype, self.max_length,
            torch.get_num_threads(), self.packed,
        )

    def _want_packing(self, mode: str) -> bool:
        if mode == "off":
            return False
        if self.head is None:
            if mode == "on":
                raise ValueError(f"packing is not supported for {type(self.model).__name__}; use --packing off")
            return False
        return mode == "on" or not self.device.startswith("cuda")

    def score_batch(self, batch: PlannedBatch) -> BatchResult:
        return BatchResult(self.rewards(batch))

    def rewards(self, batch: PlannedBatch) -> list[float]:
        import torch

        if self.packed:
            with torch.inference_mode():
                return packing.packed_reward_forward(self.model, self.head, batch).cpu().tolist()
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode():
            rewards = reward_forward(
                self.model, input_ids.to(self.device), attention_mask.to(self.device)
            )  # (B,)
        return rewards.cpu().tolist()

    def warmup(self) -> None:
        """Short and full-length passes, so lazy kernel set-up is not paid by the first live batches."""
        ids = self.tokenizer("warm up the reward model", add_special_tokens=True)["input_ids"]
        long_ids = (ids * (self.max_length // len(ids) + 1))[: self.max_length]
        for batch in ([ids], [ids] * 4, [long_ids], [long_ids, ids]):
            self.score_batch(PlannedBatch(batch))

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
