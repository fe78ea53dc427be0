"""transformers backend: the model's weights from transformers, scored by our batch-invariant forward
(service/backends/invariant*.py) for the architectures it knows (Llama-family decoders, BERT encoders), else by
transformers' own forward (packed on CPU, padded on CUDA; then within float noise of invariant, not bitwise).

Precision: `--dtype auto` computes in bf16 where the hardware runs it natively (CUDA; CPUs with AMX or
AVX-512-BF16) and in fp32 elsewhere. In bf16 the invariant forward keeps the residual stream, norms, softmax and
the reward head in fp32 (service/backends/invariant_models.py). `--dtype int8x3` / `int8x5` (invariant forward only)
compute every matmul from split int8 operands with exact integer sums: rewards near fp32, batch-invariant by
construction (what they cost: docs/benchmarks.md)."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from service.backends import packing
from rewardmodel.modeling import load_backbone, load_tokenizer, log_untrained, resolve_model, reward_forward
from rewardmodel.rendering import model_max_length
from service.backends.invariant import int8_gemm_exact
from service.backends.invariant_models import build_forward
from service.backends.precision import INT8_PRODUCTS, auto_dtype
from service.grouping import BatchResult, PlannedBatch, prefix_tree_layout, read_rows

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
    if requested.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(requested.partition(":")[2] or 0)
        if index >= count:
            have = f"{count} CUDA device(s)" if count else f"no CUDA device (torch {torch.__version__})"
            raise ValueError(f"device {requested!r}: this machine has {have}; use --device cpu or auto")
    return requested


def pick_dtype(requested: str, device: str) -> Any:
    """The activations' dtype (`int8x3` / `int8x5` compute their matmuls from fp32 activations)."""
    import torch

    if requested == "auto":
        return auto_dtype(device)
    if requested in INT8_PRODUCTS:
        return torch.float32
    return getattr(torch, DTYPES[requested])


class HFBackend:
    def __init__(self, config: Any, sources: list[Any] | None = None, name: str | None = None):
        import torch

        self.sources = sources or [resolve_model(config.model)]
        self.source = self.sources[0]
        log_untrained(self.source)
        self.device = pick_device(config.device)
        self.dtype = pick_dtype(config.dtype, self.device)
        self.gemm = config.dtype if config.dtype in INT8_PRODUCTS else "native"
        self.tokenizer = load_tokenizer(self.source)
        self.invariant = None
        # padded batches (--packing off) are the transformers forward's; the invariant forward is always packed
        forward = "transformers" if config.packing == "off" and config.forward == "auto" else config.forward
        if self.gemm != "native":
            if forward == "transformers":
                raise ValueError(f"--dtype {self.gemm} is a precision of the invariant forward: use --forward auto "
                                 "or invariant (and packing on)")
            if not int8_gemm_exact(self.device):
                raise ValueError(f"--dtype {self.gemm} needs exact int8 GEMMs and {self.device}'s are not (an int8 "
                                 "product sum saturated or the GEMM is missing): use float32 or bfloat16")
        if forward == "invariant" and config.packing == "off":
            raise ValueError("the invariant forward packs its batches: --packing off needs --forward transformers")
        weights_dtype = torch.float32 if forward != "transformers" else self.dtype
        self.model = load_backbone(self.sources, weights_dtype, self.device)
        self.name = name or config.served_name(self.source.name)
        self.max_length = model_max_length(self.tokenizer, self.model.config, config.max_tokens)
        self.pad_id = int(self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0)
        self.head = packing.head_kind(self.model)
        if forward != "transformers":
            self.invariant = build_forward(self.model, self.dtype, self.max_length, self.gemm,
                                           compile=self._compile_mode(config.compile))
            if self.invariant is None and (forward == "invariant" or self.gemm != "native"):
                raise ValueError(f"the invariant forward does not support {type(self.model).__name__}; "
                                 "use --forward transformers" + (" with another --dtype" if self.gemm != "native"
                                                                 else ""))
        if config.compile == "on" and self.invariant is None:  # (an encoder's invariant forward says so itself)
            log.warning("--compile on: %s runs transformers' forward, which is not compiled (only the invariant "
                        "forward of a Llama-family decoder is); /v1/models says compiled: false",
                        type(self.model).__name__)
            if self.invariant is None and self.dtype != torch.float32:
                self.model = self.model.to(self.dtype)
        self.packed = True if self.invariant is not None else self._want_packing(config.packing)
        if self.packed and self.invariant is None:
            self.model.set_attn_implementation(packing.register())
        # shared prefixes computed once (a tree of segments in the pass): causal decoder heads only
        self.prefix_groups = self.packed and self.head == "decoder"
        self.invariance_checked: bool | None = None  # set by warmup's self-check
        log.info(
            "loaded %s (%s) on %s, compute %s, forward %s, max_length=%d, threads=%d, packing=%s",
            self.source.path, type(self.model).__name__, self.device, self.describe_dtype(),
            ("invariant, compiled" if getattr(self.invariant, "compiled", False) else "invariant")
            if self.invariant is not None else "transformers", self.max_length,
            torch.get_num_threads(), self.packed,
        )

    def _compile_mode(self, choice: str) -> str | bool:
        """What build_forward gets for --compile: "on" (compile; a failure stops the server) or False."""
        from service.backends.fused import wants_compile

        return "on" if wants_compile(choice, self.device.split(":")[0]) else False

    def _want_packing(self, mode: str) -> bool:
        if mode == "off":
            return False
        reason = packing.unpackable(self.model.config, self.max_length)
        if self.head is None or reason:
            if mode == "on":
                raise ValueError(f"packing is not supported for {type(self.model).__name__}"
                                 f"{f' ({reason})' if reason else ''}; use --packing off")
            if reason:
                log.info("%s: %s; its batches are padded (transformers' forward)", self.source.path, reason)
            return False
        return mode == "on" or not self.device.startswith("cuda")

    def describe_dtype(self) -> str:
        return self.gemm if self.gemm != "native" else str(self.dtype).removeprefix("torch.")

    def describe(self) -> dict[str, Any]:
        """What /v1/models, the startup log and the model-info metric say about how this model computes."""
        from service.backends.precision import machine

        return {
            "dtype": self.describe_dtype(),
            "device": self.device,
            "forward": "invariant" if self.invariant is not None else "transformers",
            "compiled": bool(getattr(self.invariant, "compiled", False)),
            "batch_invariant": self.invariance_checked,
            "machine": machine(),
        }

    def score_batch(self, batch: PlannedBatch) -> BatchResult:
        return BatchResult(self.outputs(batch))

    def rewards(self, batch: PlannedBatch) -> list[float]:
        """The first head's reward of each input (its last read)."""
        return [float(values[-1, 0]) for values in self.outputs(batch)]

    def outputs(self, batch: PlannedBatch) -> list[Any]:
        """Per input, its head outputs at its read positions: a float32 array (reads, outputs)."""
        import torch

        if self.invariant is not None:
            tree = batch.layout if self.head == "decoder" and batch.min_shared > 0 else prefix_tree_layout(batch, 0)
            custom = any(r is not None for r in batch.reads)
            reads = read_rows(tree, batch.reads) if custom else None
            tiles = self.invariant.layout(tree, self.pad_id, reads).to(self.device)
            with torch.inference_mode():
                flat = self.invariant(tiles).cpu().numpy()  # (all reads, outputs)
            counts = [len(rows) for rows in tiles.read]
            return list(np.split(flat, np.cumsum(counts)[:-1]))
        if any(r is not None for r in batch.reads):
            raise ValueError("step reads need the invariant forward (Llama-family or BERT models)")
        return [row[None, :] for row in self._transformers_outputs(batch)]

    def _transformers_outputs(self, batch: PlannedBatch) -> Any:
        import torch

        if self.packed:
            with torch.inference_mode():
                return packing.packed_head_outputs(self.model, self.head, batch).cpu().numpy()
        longest = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)  # (B, T)
        for row, ids in enumerate(batch):
            input_ids[row, : len(ids)] = torch.as_tensor(ids, dtype=torch.long)
            attention_mask[row, : len(ids)] = 1
        with torch.inference_mode():
            outputs = reward_forward(
                self.model, input_ids.to(self.device), attention_mask.to(self.device), heads=True,
            )  # (B, outputs)
        return outputs.cpu().numpy()

    def warmup(self) -> None:
        """Short and full-length passes, so lazy kernel set-up is not paid by the first live batches; with the
        invariant forward, a self-check that an input scores the same bits alone, packed and in a prefix tree."""
        ids = self.tokenizer("warm up the reward model", add_special_tokens=True)["input_ids"]
        long_ids = (ids * (self.max_length // len(ids) + 1))[: self.max_length]
        for batch in ([ids], [ids] * 4, [long_ids], [long_ids, ids]):
            self.score_batch(PlannedBatch(batch))
        if self.invariant is not None:
            self.invariance_checked = self.self_check(ids)

    def self_check(self, ids: list[int]) -> bool:
        """An input scored alone, packed among others in a pass longer than one GEMM call (invariant.CALL_TILES
        tiles), and a prefix-group member scored alone and grouped: the same bits, or the log says so."""
        from service.backends.invariant import CALL_TILES, ROW_TILE

        other = (ids[::-1] * 3)[: max(2, min(len(ids) * 3, self.max_length))]
        prefix = (ids * 8)[: min(40, self.max_length - 2)]
        long_ids = (other * (self.max_length // len(other) + 1))[: self.max_length]
        fill = [long_ids] * (-(-(CALL_TILES * ROW_TILE + 100) // len(long_ids)))
        alone = self.rewards(PlannedBatch([ids]))[0]
        packed = self.rewards(PlannedBatch([other, ids, other[:7], *fill]))[1]
        members = [prefix + ids[:1], prefix + other[:2]]
        grouped = self.rewards(PlannedBatch(members, min_shared=16))[0]
        single = self.rewards(PlannedBatch(members[:1]))[0]
        ok = alone == packed and grouped == single
        if not ok:
            log.error("batch invariance self-check FAILED on this machine (alone %r, packed %r; grouped %r, alone "
                      "%r): rewards may differ in the last bits with what shares their batch", alone, packed,
                      grouped, single)
        return ok

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()
