"""vLLM backend: vLLM's pooling runner computes the rewards (`rewardserve serve --backend vllm`).

The engine still renders, truncates and batches; this backend hands vLLM token ids (`TokensPrompt`), so both
backends score exactly the same tokens, and asks for the `classify` task with `use_activation=False`: the
raw logit of the one-label head on the last token, which is what the hf backend returns.

vLLM runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set otherwise) and is only called from
the batcher's worker thread. On CPU it runs eager (no compile) in float32 unless `--dtype` says otherwise.
Prefix groups: vLLM caches computed KV blocks across scheduler steps (automatic prefix caching, on by default
for last-token pooling decoders), but inputs of one step do not share; so for a batch with prefix groups
the groups' prefixes are run first, in a step of their own, and the members then read the prefix's cached
blocks (whole blocks only: groups whose prefix is shorter than one block are not primed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from rewardmodel.modeling import load_tokenizer, resolve_model
from rewardmodel.rendering import model_max_length
from service.backends.precision import INT8_PRODUCTS
from service.generation.vllm_settings import engine_kwargs, explain_start_failure
from service.grouping import BatchResult, PlannedBatch

log = logging.getLogger("rewardserve.vllm")


def _as_values(rewards: list[float]) -> list[Any]:
    """One (1, 1) array per input: one read, one head."""
    return [np.array([[r]], dtype=np.float32) for r in rewards]


class VLLMBackend:
    def __init__(self, config: Any, sources: list[Any] | None = None, name: str | None = None):
        if sources is not None and len(sources) > 1:
            raise ValueError("the vllm backend serves one model per backbone (no shared heads)")
        self.source = sources[0] if sources else resolve_model(config.model)
        if (self.source.gguf_file or self.source.untrained_head or self.source.heads or self.source.head_layers
                or self.source.prm is not None):
            raise ValueError(
                f"the vllm backend serves reward-model checkpoints (a directory with config.json and a trained "
                f"one-label head); {config.model!r} is not one: use --backend hf, or pass --model DIR"
            )
        if config.dtype in INT8_PRODUCTS:
            raise ValueError(f"--dtype {config.dtype} is a precision of the hf backend's invariant forward, not vLLM's")
        try:
            from vllm import LLM, PoolingParams
            from vllm.platforms import current_platform
        except ImportError as exc:
            raise ValueError(f"the vllm backend needs vLLM (pip install 'rewardserve[vllm]'): {exc}") from exc
        from transformers import AutoConfig

        path = str(self.source.path)
        self.tokenizer = load_tokenizer(self.source)
        self.max_length = model_max_length(self.tokenizer, AutoConfig.from_pretrained(path), config.max_tokens)
        on_cpu = current_platform.is_cpu()
        dtype = config.dtype if config.dtype != "auto" else ("float32" if on_cpu else "auto")
        memory = engine_kwargs(on_cpu, config.vllm_kv_cache_gib)
        try:
            self.llm = LLM(
                model=path, tokenizer=path, runner="pooling", dtype=dtype, enforce_eager=on_cpu,
                max_model_len=self.max_length, seed=0, **memory,
            )
        except Exception as exc:
            raise explain_start_failure(exc) from exc
        self._params = PoolingParams(use_activation=False)
        cache = self.llm.llm_engine.vllm_config.cache_config
        self.block_size = int(cache.block_size)
        self.name = name or config.served_name(self.source.name)
        self.packed = True  # vLLM batches without padding: a batch costs its real tokens
        self.prefix_groups = bool(cache.enable_prefix_caching)
        log.info(
            "vLLM pooling runner on %s: %s, dtype=%s, max_length=%d, prefix caching=%s (block %d)",
            "cpu" if on_cpu else current_platform.device_name, path, dtype, self.max_length,
            self.prefix_groups, self.block_size,
        )

    def _encode(self, batch: Sequence[Sequence[int]]) -> list[float]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in batch]
        outputs = self.llm.encode(prompts, pooling_params=self._params, pooling_task="classify", use_tqdm=False)
        return [float(out.outputs.data.reshape(-1)[0]) for out in outputs]

    def score_batch(self, batch: PlannedBatch) -> BatchResult:
        if any(r is not None for r in batch.reads):
            raise ValueError("the vllm backend reads one reward per input (no step reads)")
        groups = [g for g in batch.groups if g.prefix_len >= self.block_size]
        if not (groups and self.prefix_groups):  # the hf tree does not apply
            return BatchResult(_as_values(self._encode(batch)), saved_tokens=0, shared_inputs=0)
        self._encode([batch[g.members[0]][: g.prefix_len] for g in groups])  # fills the prefix cache
        # the members read the prefix's whole cached blocks; the priming pass computed the prefix once
        cached = lambda g: g.prefix_len // self.block_size * self.block_size
        saved = sum(max(0, len(g.members) * cached(g) - g.prefix_len) for g in groups)
        shared = sum(len(g.members) for g in groups) if saved else 0
        return BatchResult(_as_values(self._encode(batch)), saved_tokens=saved, shared_inputs=shared)

    def warmup(self) -> None:
        ids = self.tokenizer("warm up the reward model", add_special_tokens=True)["input_ids"]
        long_ids = (ids * (self.max_length // len(ids) + 1))[: self.max_length]
        for batch in ([ids], [ids] * 4, [long_ids]):
            self._encode(batch)
        self.llm.reset_prefix_cache()

    def close(self) -> None:
        self.llm = None
