"""DPO and its family: the step functions, `train_dpo`, and the export (a plain causal-LM checkpoint with its tokenizer).

Loss types: sigmoid | ipo | hinge | robust (training.losses.dpo_loss, against a reference), simpo | orpo
(reference-free: no reference model is loaded), kto (unpaired examples, training/kto.py).

Pairs come from training.data.load_preferences (HH dialogues, TRL explicit-prompt and conversational formats); each
is tokenized once into (prompt, chosen, rejected) ids by training.policy (chat template; prompt tokens masked out).
A batch of B pairs is one right-padded (2B, T) batch, chosen rows first, as in TRL. The reference is a frozen copy
of the policy (or --ref, or with LoRA the policy with its adapters off); --precompute-ref computes its log-probs
once before training and frees it.

Output folder: config.json + model.safetensors + generation_config.json + tokenizer (with chat template),
training_config.json (resolved config, final metrics, export check), and the loop's checkpoints/ tensorboard/
metrics.jsonl.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from training import loop
from training.checkpoint import atomic_write_text
from training.data import PreferencePair, load_preferences, pad_right, require_records
from training.loop import TrainConfig, given_flags, train_config_from_args
from training.kto import KTOCollator, kto_step, load_unpaired, tokenize_unpaired
from training.losses import DPO_LOSS_TYPES, dpo_loss, orpo_loss, simpo_loss
from training.policy import (
    report_cut,
    check_export,
    completion_logprobs,
    export_policy,
    fit,
    policy_and_reference,
    split_completions,
)
from training.trainable import policy_without_reference

log = logging.getLogger("rewardserve.train.dpo")

EXPORT_CHECK_PAIRS = 4
REFERENCE_FREE = ("simpo", "orpo")
LOSS_TYPES = (*DPO_LOSS_TYPES, *REFERENCE_FREE, "kto")


class DPOConfig(BaseModel):
    """A DPO run: the policy, the reference, the data, the loss; and the loop's settings."""

    policy: str = Field("smollm2", description="smollm2 | a Hugging Face causal-LM checkpoint folder.")
    ref: str | None = Field(None, description="Reference model folder; default: a frozen copy of the policy.")
    data: str = Field(description="Training preference pairs (.jsonl/.json[.gz]/.parquet; see training.data).")
    eval: str | None = Field(None, description="Eval preference pairs (periodic eval: accuracy, margin).")
    max_length: int = Field(512, ge=8, description="Token cap for prompt + completion (the prompt is cut first).")
    beta: float = Field(0.1, gt=0, description="DPO/KTO/SimPO beta (for ipo: the regularization tau; SimPO's "
                        "paper uses 2 to 2.5).")
    loss_type: str = Field("sigmoid", description=f"One of {', '.join(LOSS_TYPES)}.")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="Assumed share of flipped labels (sigmoid, robust, "
                                   "simpo).")
    simpo_gamma: float = Field(0.5, ge=0, description="SimPO's target reward margin gamma.")
    orpo_lambda: float = Field(0.1, ge=0, description="ORPO's weight lambda of the odds-ratio term.")
    desirable_weight: float = Field(1.0, ge=0, description="KTO's weight lambda_D of desirable examples.")
    undesirable_weight: float = Field(1.0, ge=0, description="KTO's weight lambda_U of undesirable examples.")
    precompute_ref: bool = Field(False, description="Compute the reference log-probs once before training.")
    train: TrainConfig


# ---------------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class DPOItem:
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_chosen: float | None = None  # reference log-probs, when precomputed
    ref_rejected: float | None = None


@dataclass
class DPOBatch:
    """B pairs as (2B, T) right-padded rows: [0, B) prompt + chosen, [B, 2B) prompt + rejected."""

    input_ids: torch.Tensor  # (2B, T)
    attention_mask: torch.Tensor  # (2B, T)
    completion_mask: torch.Tensor  # (2B, T): 1 on completion tokens
    ref_logps: torch.Tensor | None = None  # (2B,) precomputed reference log-probs

    def to(self, device: Any) -> DPOBatch:
        move = lambda x: None if x is None else x.to(device)
        return DPOBatch(move(self.input_ids), move(self.attention_mask), move(self.completion_mask), move(self.ref_logps))


def tokenize_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], max_length: int, name: Any = None
                   ) -> list[DPOItem]:
    """The pairs' ids, fit into max_length; how many were cut (and made identical by it) is logged, naming `name`."""
    items, cut, made_same = [], 0, 0
    for pair in pairs:
        prompt, (chosen, rejected) = split_completions(tokenizer, pair.prompt_messages, [pair.chosen, pair.rejected])
        whole = len(prompt) + max(len(chosen), len(rejected)) > max_length
        differ = chosen != rejected
        prompt, (chosen, rejected) = fit(prompt, [chosen, rejected], max_length)
        cut += whole
        made_same += whole and differ and chosen == rejected
        items.append(DPOItem(prompt, chosen, rejected))
    report_cut(name, cut, len(items), "pairs", "--max-length", max_length)
    if made_same:
        log.warning("%s: %d of %d pairs are identical after truncation to --max-length %d: they carry no "
                    "preference; raise --max-length", name, made_same, len(items), max_length)
    return items


class DPOCollator:
    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def lengths(self, items: Sequence[DPOItem]) -> list[int]:
        """Padded cost of each item (its longer row), for the loop's length-grouped batching."""
        return [len(i.prompt) + max(len(i.chosen), len(i.rejected)) for i in items]

    def __call__(self, items: Sequence[DPOItem]) -> DPOBatch:
        rows = [i.prompt + i.chosen for i in items] + [i.prompt + i.rejected for i in items]  # (2B,)
        masks = [[0] * len(i.prompt) + [1] * len(i.chosen) for i in items]
        masks += [[0] * len(i.prompt) + [1] * len(i.rejected) for i in items]
        input_ids, attention_mask = pad_right(rows, self.pad_token_id)  # (2B, T), (2B, T)
        completion_mask, _ = pad_right(masks, 0)  # (2B, T)
        ref = None
        if items[0].ref_chosen is not None:
            ref = torch.tensor([i.ref_chosen for i in items] + [i.ref_rejected for i in items], dtype=torch.float32)
        return DPOBatch(input_ids, attention_mask, completion_mask, ref)


# --------------------------------------------------------------------------------------------- model, step


class DPOModule(torch.nn.Module):
    """The policy, and the reference it is compared with (a frozen module, or the policy under `ref_context`)."""

    def __init__(self, policy: torch.nn.Module, ref: torch.nn.Module | None = None,
                 ref_context: Callable[[], Any] | None = None):
        super().__init__()
        self.policy = policy
        self.ref = ref
        self.ref_context = ref_context  # e.g. peft's disable_adapter: the LoRA policy without its adapters

    def train(self, mode: bool = True) -> DPOModule:
        super().train(mode)
        if self.ref is not None:
            self.ref.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
                with_ref: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(policy log-probs (2B,), reference log-probs (2B,) or None)."""
        logps = completion_logprobs(self.policy, input_ids, attention_mask, completion_mask)["logps"].sum(-1)
        ref = self.reference(input_ids, attention_mask, completion_mask) if with_ref else None
        return logps, ref

    @torch.no_grad()
    def reference(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        if self.ref is None and self.ref_context is None:
            raise RuntimeError("no reference model: the reference log-probs were meant to be precomputed")
        model = self.ref if self.ref is not None else self.policy
        with self.ref_context() if self.ref is None else nullcontext():
            return completion_logprobs(model, input_ids, attention_mask, completion_mask)["logps"].sum(-1)


def dpo_step(model: torch.nn.Module, batch: DPOBatch, beta: float, loss_type: str, label_smoothing: float
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logps, ref = model(batch.input_ids, batch.attention_mask, batch.completion_mask, with_ref=batch.ref_logps is None)
    ref = batch.ref_logps if ref is None else ref  # (2B,)
    tokens = batch.completion_mask.sum(-1)  # (2B,)
    (pc, pr), (rc, rr), (tc, tr) = logps.chunk(2), ref.chunk(2), tokens.chunk(2)
    lengths = (tc, tr) if loss_type == "ipo" else (None, None)
    return dpo_loss(pc, pr, rc, rr, beta, loss_type, label_smoothing, *lengths)


def reference_free_step(model: torch.nn.Module, batch: DPOBatch, loss_type: str, beta: float, gamma: float,
                        lam: float, label_smoothing: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO or ORPO on one batch: policy log-probs only, normalised by each completion's length in the loss."""
    logps, _ = model(batch.input_ids, batch.attention_mask, batch.completion_mask, with_ref=False)  # (2B,)
    (pc, pr), (tc, tr) = logps.chunk(2), batch.completion_mask.sum(-1).chunk(2)
    if loss_type == "simpo":
        return simpo_loss(pc, pr, tc, tr, beta, gamma, label_smoothing)
    return orpo_loss(pc, pr, tc, tr, lam)


@torch.no_grad()
def precompute_reference(module: DPOModule, items: list[DPOItem], collate: DPOCollator, batch_size: int) -> list[DPOItem]:
    """The items with their reference log-probs filled in (one pass of the reference over the data)."""
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = collate(chunk)
        ref = module.reference(batch.input_ids, batch.attention_mask, batch.completion_mask)  # (2b,)
        rc, rr = ref.chunk(2)
        out += [replace(item, ref_chosen=float(c), ref_rejected=float(r)) for item, c, r in zip(chunk, rc, rr)]
    return out


# ---------------------------------------------------------------------------------------------------- train


def build_module(config: DPOConfig) -> tuple[DPOModule, Any, Any, Any]:
    """(module, tokenizer, peft model or None, policy source path); no reference for SimPO and ORPO."""
    if config.loss_type in REFERENCE_FREE:
        trained, tokenizer, peft_model, path = policy_without_reference(config.policy, config.train.lora)
        return DPOModule(trained), tokenizer, peft_model, path
    trained, ref, ref_context, tokenizer, peft_model, path = policy_and_reference(
        config.policy, config.ref, config.train.lora
    )
    return DPOModule(trained, ref, ref_context), tokenizer, peft_model, path


@dataclass
class DPOResult:
    output_dir: Path
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    is_main: bool = True


def check_config(config: DPOConfig) -> None:
    if config.loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss {config.loss_type!r}; use one of {LOSS_TYPES}")
    if config.loss_type in ("ipo", "hinge", "orpo", "kto") and config.label_smoothing:
        raise ValueError(f"--label-smoothing does not apply to --loss-type {config.loss_type}")
    if config.loss_type in REFERENCE_FREE and (config.ref or config.precompute_ref):
        raise ValueError(f"{config.loss_type} uses no reference model: drop --ref / --precompute-ref")
    if config.loss_type == "kto" and config.precompute_ref:
        raise ValueError("kto compares every batch with mismatched pairs of that batch: --precompute-ref does not apply")


def make_step(config: DPOConfig) -> Callable:
    if config.loss_type == "kto":
        return partial(kto_step, beta=config.beta, desirable_weight=config.desirable_weight,
                       undesirable_weight=config.undesirable_weight)
    if config.loss_type in REFERENCE_FREE:
        return partial(reference_free_step, loss_type=config.loss_type, beta=config.beta, gamma=config.simpo_gamma,
                       lam=config.orpo_lambda, label_smoothing=config.label_smoothing)
    return partial(dpo_step, beta=config.beta, loss_type=config.loss_type, label_smoothing=config.label_smoothing)


def read_data(config: DPOConfig) -> tuple[list, list | None]:
    """(training records, eval records or None): preference pairs, or for KTO unpaired examples (pairs split in two).
    Read before any model is loaded, so a bad file fails at once; a given file with no records is refused."""
    read = load_unpaired if config.loss_type == "kto" else load_preferences
    data = require_records(read(config.data), config.data, "--data")
    return data, require_records(read(config.eval), config.eval, "--eval") if config.eval else None


def load_items(config: DPOConfig, tokenizer: Any, data: list, eval_data: list | None) -> tuple[Any, list, list | None]:
    """(collator, training items, eval items or None): the records of read_data, tokenized."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if config.loss_type == "kto":
        tokenize: Any = tokenize_unpaired
        collate: Any = KTOCollator(pad, config.max_length)
    else:
        tokenize, collate = tokenize_pairs, DPOCollator(pad)
    items = tokenize(tokenizer, data, config.max_length, config.data)
    return collate, items, tokenize(tokenizer, eval_data, config.max_length, config.eval) if eval_data else None


def train_dpo(config: DPOConfig) -> DPOResult:
    """Train a policy with DPO (or SimPO, ORPO, KTO), export it to config.train.output_dir."""
    check_config(config)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    loop.seed_everything(config.train.seed)
    data, eval_data = read_data(config)
    module, tokenizer, peft_model, policy_path = build_module(config)
    loop.check_output_dir(config.train.output_dir, policy_path, "--policy")
    collate, items, eval_items = load_items(config, tokenizer, data, eval_data)
    log.info("DPO (%s, beta %g) on %d items (eval: %s) from %s", config.loss_type, config.beta, len(items),
             len(eval_items) if eval_items else "none", policy_path)
    if config.precompute_ref:
        size = config.train.eval_batch_size or 2 * config.train.batch_size
        items = precompute_reference(module, items, collate, size)
        eval_items = precompute_reference(module, eval_items, collate, size) if eval_items else None
        module.ref, module.ref_context = None, None  # not needed any more
    step = make_step(config)
    run_config = {"dpo": config.model_dump(mode="json", exclude={"train"}), "policy_path": str(policy_path)}

    result = loop.train(config.train, module, items, collate, step, eval_items, run_config)

    out = Path(config.train.output_dir)
    if result.is_main:
        module = result.model.eval()
        check = collate((eval_items or items)[:EXPORT_CHECK_PAIRS])
        with torch.no_grad():
            reference = module(check.input_ids, check.attention_mask, check.completion_mask, with_ref=False)[0]
        merged = peft_model.merge_and_unload() if peft_model is not None else module.policy
        summary = {**run_config, "train": config.train.model_dump(mode="json"), "steps": result.state.step,
                   "final_train_metrics": result.train_metrics, "final_eval_metrics": result.eval_metrics}
        export_policy(merged, tokenizer, out, {"training_config.json": json.dumps(summary, indent=2) + "\n"})
        batch = {"input_ids": check.input_ids, "attention_mask": check.attention_mask,
                 "completion_mask": check.completion_mask}
        summary["export_check_max_abs_diff"] = check_export(reference, batch, out)
        atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
        log.info("exported the DPO policy to %s", out)
    result.accelerator.wait_for_everyone()
    return DPOResult(out, result.train_metrics, result.eval_metrics, result.is_main)


# ------------------------------------------------------------------------------------------------------ CLI

_DPO_FLAGS = ("policy", "ref", "data", "eval", "max_length", "beta", "loss_type", "label_smoothing", "precompute_ref",
              "simpo_gamma", "orpo_lambda", "desirable_weight", "undesirable_weight")


def config_from_args(args: Any) -> DPOConfig:
    return DPOConfig(**given_flags(args, _DPO_FLAGS), train=train_config_from_args(args))


def main(args: Any) -> int:
    result = train_dpo(config_from_args(args))
    if result.is_main:
        acc, margin = result.eval_metrics.get("eval/accuracy"), result.eval_metrics.get("eval/margin")
        shown = f" (eval accuracy {acc:.4f}, margin {margin:.4f})" if acc is not None else ""
        print(f"DPO policy saved to {result.output_dir}{shown}")
    return 0
