"""Reward-model training: the Bradley-Terry step function, `train_rm`, and the export the server loads.

Rewards are read through `rewardmodel.modeling.reward_forward` on ids from `rewardmodel.rendering.encode_input` (via
`training.data.PreferenceCollator`), the same two functions the server uses, so a trained model scores at serving
time exactly what it scored while training.

The output folder is a plain Hugging Face checkpoint (`AutoModelForSequenceClassification.from_pretrained(out)`
works; LoRA is merged first) plus:
    reward_stats.json      mean/std of the rewards on the eval set (the server's --normalize uses them)
    training_config.json   the resolved config, final metrics, library versions, the export check
    checkpoints/ tensorboard/ metrics.jsonl   from the loop
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, Field

from rewardmodel.modeling import load_reward_model, load_tokenizer, resolve_model, reward_forward
from rewardmodel.normalization import RewardStats, save_stats
from rewardmodel.rendering import model_max_length
from training import loop
from training.checkpoint import atomic_write_text
from training.data import PreferenceBatch, PreferenceCollator, load_preferences, require_records
from training.losses import bradley_terry_loss
from training.loop import TrainConfig, given_flags, train_config_from_args

log = logging.getLogger("rewardserve.train.rm")

STATS_PAIRS_WITHOUT_EVAL = 512  # with no eval set, reward_stats.json is measured on this many training pairs
EXPORT_CHECK_PAIRS = 8
EXPORT_CHECK_TOLERANCE = 1e-3


class RMConfig(BaseModel):
    """A reward-model run: what to train on, and the loop's settings."""

    base: str = Field("minilm", description="minilm | smollm2 | a Hugging Face checkpoint folder.")
    data: str = Field(description="Training preference pairs (.jsonl/.json[.gz]/.parquet; see training.data).")
    eval: str | None = Field(None, description="Eval preference pairs: periodic eval and reward_stats.json.")
    max_length: int = Field(512, ge=8, description="Token cap per side (the model's own limit also applies).")
    center_rewards_coefficient: float | None = Field(None, ge=0, description="Reward-centering penalty weight.")
    disable_dropout: bool = Field(True, description="Turn dropout off in the base model (as TRL's RewardTrainer).")
    train: TrainConfig


@dataclass
class RMResult:
    output_dir: Path
    module: torch.nn.Module  # the trained RewardModule (LoRA merged), eval mode
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    stats: RewardStats | None = None
    is_main: bool = True


class RewardModule(torch.nn.Module):
    """What the loop trains: forward is the service's reward_forward, so DDP sees one forward per batch."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # a transformers *ForSequenceClassification (LoRA layers injected in place, if any)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return reward_forward(self.model, input_ids, attention_mask)  # (N,) float32


def rm_step(
    model: torch.nn.Module, batch: PreferenceBatch, center_rewards_coefficient: float | None = None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry on B pairs: chosen and rejected go through ONE forward of 2B rows."""
    rewards = model(batch.input_ids, batch.attention_mask)  # (2B,): rows [0, B) chosen, [B, 2B) rejected
    chosen, rejected = rewards.chunk(2)  # (B,), (B,)
    loss, metrics = bradley_terry_loss(chosen, rejected, batch.margin, center_rewards_coefficient)
    metrics["reward_sq"] = (rewards.detach().float() ** 2).mean()  # with the means: the std of all rewards
    return loss, metrics


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def drop_dequantized_gguf_marker(model: torch.nn.Module) -> None:
    """A model read from a GGUF file (smollm2) on CPU is dequantized to plain float weights but keeps transformers'
    GGUF quantizer, which refuses `save_pretrained`; the weights are ordinary tensors, so drop the marker."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = any(not p.dtype.is_floating_point for p in model.parameters()) or any(
        "gguf" in type(m).__name__.lower() for m in model.modules()
    )
    if packed:
        raise ValueError(f"{type(model).__name__} holds quantized weights: load a float checkpoint to train it")
    quantizer.remove_quantization_config(model)


def stats_from_metrics(metrics: dict[str, float], prefix: str = "eval/") -> RewardStats | None:
    """Mean and (population) std of all rewards, chosen and rejected, from the step metrics' means."""
    mean = (metrics[f"{prefix}reward_chosen"] + metrics[f"{prefix}reward_rejected"]) / 2
    var = metrics[f"{prefix}reward_sq"] - mean**2
    std = math.sqrt(max(var, 0.0))
    if not (math.isfinite(mean) and math.isfinite(std) and std > 1e-8):
        log.warning("rewards have mean %s and std %s: no reward_stats.json written", mean, std)
        return None
    return RewardStats(mean, std)


# -------------------------------------------------------------------------------------------------- export


@torch.no_grad()
def _rewards(module: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    device = next(module.parameters()).device
    return module(batch.input_ids.to(device), batch.attention_mask.to(device)).cpu()  # (2B,)


def _move_into(tmp: Path, out: Path) -> None:
    """Move an export from tmp into out; config.json goes last, so a half-moved export is no checkpoint."""
    (out / "config.json").unlink(missing_ok=True)
    for f in sorted(tmp.iterdir(), key=lambda p: p.name == "config.json"):
        f.chmod(0o644)  # safetensors writes 0600; an exported model is meant to be read by a server (other uid)
        os.replace(f, out / f.name)
    tmp.rmdir()


def export(model: Any, tokenizer: Any, max_length: int, out: Path, extra_files: dict[str, str]) -> None:
    """A plain HF checkpoint (fp32 safetensors, config, tokenizer + chat template) and extra JSON files.

    The tokenizer's model_max_length becomes the training max_length, so the server truncates inputs exactly
    where training did (rewardmodel.rendering.model_max_length takes the smallest limit).
    """
    tmp = out / ".tmp-export"
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    tokenizer.model_max_length = max_length
    tokenizer.save_pretrained(tmp)
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    _move_into(tmp, out)


def check_export(reference: torch.Tensor, batch: PreferenceBatch, out: Path) -> float:
    """Reload the export the way the server does and compare its rewards with the training-time ones."""
    served = load_reward_model(resolve_model(str(out)), torch.float32, "cpu")
    got = _rewards(RewardModule(served), batch)
    diff = float((got - reference).abs().max())
    if diff > EXPORT_CHECK_TOLERANCE:
        raise RuntimeError(f"export check failed: served rewards differ from training-time ones by {diff:.3g}")
    log.info("export check: served rewards match training-time rewards (max |diff| %.2e)", diff)
    return diff


# ---------------------------------------------------------------------------------------------------- train


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("rewardserve", "torch", "transformers", "accelerate", "peft"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "not installed"
    return out


def train_rm(config: RMConfig) -> RMResult:
    """Train a reward model, export it to config.train.output_dir, return the trained module and metrics."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    loop.seed_everything(config.train.seed)
    pairs = require_records(load_preferences(config.data), config.data, "--data")  # the data first: quick errors
    eval_pairs = require_records(load_preferences(config.eval), config.eval, "--eval") if config.eval else None
    source = resolve_model(config.base)
    loop.check_output_dir(config.train.output_dir, source.path, "--base")
    tokenizer = load_tokenizer(source)
    hf_model = load_reward_model(source, torch.float32, "cpu")
    drop_dequantized_gguf_marker(hf_model)
    max_length = model_max_length(tokenizer, hf_model.config, config.max_length)
    log.info("training %s on %d pairs (eval: %s), max_length %d", source.path, len(pairs),
             len(eval_pairs) if eval_pairs else "none", max_length)
    if config.disable_dropout:
        disable_dropout(hf_model)
    peft_model = loop.add_lora(hf_model, config.train.lora) if config.train.lora else None
    module = RewardModule(peft_model.get_base_model() if peft_model is not None else hf_model)
    collate = PreferenceCollator(tokenizer, max_length)
    # Say what max_length cuts, per file (group_by_length keeps the ids: the loop's lengths() reuses them).
    collate.truncation(pairs, keep=config.train.group_by_length).report(config.data, max_length)
    if eval_pairs:
        collate.truncation(eval_pairs).report(config.eval, max_length)
    step = partial(rm_step, center_rewards_coefficient=config.center_rewards_coefficient)
    run_config = {"rm": config.model_dump(mode="json", exclude={"train"}), "resolved_max_length": max_length,
                  "base_path": str(source.path)}

    result = loop.train(config.train, module, pairs, collate, step, eval_pairs, run_config)

    stats_metrics, stats_split = result.eval_metrics, "eval"
    if not eval_pairs:  # every process takes part in this evaluation
        stats_split, sample = "train", pairs[:STATS_PAIRS_WITHOUT_EVAL]
        stats_metrics = loop.evaluate(result.model, sample, collate, step, 2 * config.train.batch_size, result.accelerator)
    stats = stats_from_metrics(stats_metrics)
    out = Path(config.train.output_dir)
    if result.is_main:
        module = result.model.eval()
        check_batch = collate((eval_pairs or pairs)[:EXPORT_CHECK_PAIRS])
        reference = _rewards(module, check_batch)  # (2K,) training-time rewards, before any merge
        merged = peft_model.merge_and_unload() if peft_model is not None else module.model  # in place: module stays valid
        summary = {
            **run_config, "train": config.train.model_dump(mode="json"), "versions": _versions(),
            "final_train_metrics": result.train_metrics, "final_eval_metrics": result.eval_metrics,
            "steps": result.state.step,
        }
        export(merged, tokenizer, max_length, out, {"training_config.json": json.dumps(summary, indent=2) + "\n"})
        if stats is not None:
            save_stats(out, stats, split=stats_split, rewards=2 * len(eval_pairs or pairs[:STATS_PAIRS_WITHOUT_EVAL]),
                       max_length=max_length)
        summary["export_check_max_abs_diff"] = check_export(reference, check_batch, out)
        atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
        log.info("exported reward model to %s", out)
    result.accelerator.wait_for_everyone()
    return RMResult(out, result.model, result.train_metrics, result.eval_metrics, stats, result.is_main)


# ------------------------------------------------------------------------------------------------------ CLI

_RM_FLAGS = ("base", "data", "eval", "max_length", "center_rewards_coefficient", "disable_dropout")


def config_from_args(args: Any) -> RMConfig:
    """`rewardserve train rm` flags -> RMConfig; flags left out keep the config's defaults."""
    return RMConfig(**given_flags(args, _RM_FLAGS), train=train_config_from_args(args))


HEAD_ONLY_DEFAULTS = {"epochs": 1000, "lr": 1e-3, "weight_decay": 0.0, "patience": 200}


def _main_head_only(args: Any, config: RMConfig) -> int:
    import shlex
    import sys

    from training.rm_head import train_head_only

    loop.check_output_dir(config.train.output_dir, resolve_model(config.base).path, "--base")
    pick = lambda name: getattr(args, name, None) if getattr(args, name, None) is not None else HEAD_ONLY_DEFAULTS[name]  # noqa: E731
    command = "rewardserve " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else None
    summary = train_head_only(config, epochs=pick("epochs"), lr=pick("lr"), weight_decay=pick("weight_decay"),
                              patience=pick("patience"), command=command,
                              feature_cache=getattr(args, "feature_cache", None),
                              num_layers=getattr(args, "num_layers", None), l2=getattr(args, "l2", None),
                              bootstrap=getattr(args, "bootstrap", None) or 0, pick_l2=getattr(args, "pick_l2", None),
                              also_data=getattr(args, "also_data", None) or (),
                              also_eval=getattr(args, "also_eval", None) or (),
                              include_heads=getattr(args, "include_head", None) or (),
                              gate=getattr(args, "gate", None), read_layers=getattr(args, "read_layers", None))
    acc = (summary.get("final_eval") or {}).get("accuracy")
    if len(summary.get("heads") or []) > 1:
        print(f"{len(summary['heads'])} reward heads saved to {args.output}")
        return 0
    print(f"reward head saved to {args.output}" + (f" (eval accuracy {acc:.4f})" if acc is not None else ""))
    return 0


HEAD_ONLY_FLAGS = ("l2", "pick_l2", "bootstrap", "include_head", "gate", "read_layers", "also_data", "also_eval",
                   "feature_cache", "patience", "num_layers")
"""Flags of --head-only training alone: a full fine-tune refuses them."""

IGNORED_BY_HEAD_ONLY = (
    "lora", *loop.LORA_FLAGS, "max_steps", "batch_size", "grad_accum", "max_grad_norm", "warmup_steps", "warmup_ratio", "lr_schedule", "eval_every", "save_every", "keep_checkpoints",
    "log_every", "eval_batch_size", "center_rewards_coefficient", "bf16", "resume", "disable_dropout",
    "group_by_length",
)
"""Flags of the training loop (or of fine-tuning the base) that --head-only has no use for: it refuses them."""

IGNORED_WITH_L2 = ("epochs", "lr", "weight_decay", "patience")
"""--head-only flags of the epoch loop, which --l2 (a solve to convergence) replaces."""


def check_flags(args: Any) -> None:
    """Refuse flags that the chosen mode would silently ignore: say so rather than train something else."""
    if getattr(args, "head_only", False):
        ignored = list(given_flags(args, IGNORED_BY_HEAD_ONLY))  # (none of them defaults to a value)
        if ignored:
            raise ValueError(f"{loop.flag_of(ignored[0])} does not apply to --head-only training (a frozen base, features "
                             "computed once, only the head fit on them): drop it, or drop --head-only")
        ignored = list(given_flags(args, IGNORED_WITH_L2)) if getattr(args, "l2", None) else []
        if ignored:
            raise ValueError(f"{loop.flag_of(ignored[0])} does not apply to --head-only --l2 (the head is solved to "
                             "convergence, not trained for epochs): drop it, or drop --l2")
        return
    given = [f for f in HEAD_ONLY_FLAGS if getattr(args, f, None) not in (None, [], (), 0, False)]
    if given:  # they would be ignored by a full fine-tune
        raise ValueError(f"{loop.flag_of(given[0])} applies to --head-only training (a frozen base and its head); add "
                         "--head-only, or drop it")


def main(args: Any) -> int:
    check_flags(args)
    if getattr(args, "head_only", False):
        return _main_head_only(args, config_from_args(args))
    result = train_rm(config_from_args(args))
    if not result.is_main:
        return 0
    acc = result.eval_metrics.get("eval/accuracy")
    print(f"reward model saved to {result.output_dir}" + (f" (eval accuracy {acc:.4f})" if acc is not None else ""))
    return 0
