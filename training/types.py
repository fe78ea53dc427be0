"""The loop's types, in one module that the loop, checkpoints and the run log all import (no cycle between them):
the training config, where training stands, and the shapes of the functions trainers hand the loop."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import BaseModel, Field

Metrics = dict[str, torch.Tensor]
StepFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Metrics]]
Update = list[tuple[Any, int]]  # (micro-batch, items) accumulated into one optimizer update
RolloutFn = Callable[[torch.nn.Module, Update], tuple[list[Update], Metrics]]


class TrainingDiverged(RuntimeError):
    """A non-finite loss or gradient norm: the loop stops before the optimizer step, so nothing bad is saved or
    exported (the message is one line, for the command's error)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during the loop: where the run stood, for the command's one-line message."""

    def __init__(self, step: int, total: int, last_checkpoint: int | None):
        super().__init__(step)
        self.step, self.total, self.last_checkpoint = step, total, last_checkpoint

    def __str__(self) -> str:
        saved = (f"the last checkpoint is step {self.last_checkpoint}" if self.last_checkpoint is not None else
                 "no checkpoint saved yet, --resume starts over")
        return f"interrupted at step {self.step} of {self.total} ({saved}): continue with --resume"


class LoraSettings(BaseModel):
    """LoRA adapters (peft). The task head (`score` / `classifier`) stays fully trainable (modules_to_save)."""

    r: int = Field(16, gt=0, description="LoRA rank.")
    alpha: float = Field(32.0, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | None = Field(
        None, description="Module names to adapt; None: peft's default for the architecture (query/value projections)."
    )
    modules_to_save: list[str] | None = Field(
        None, description="Extra modules trained in full; the sequence-classification head is always added."
    )


class TrainConfig(BaseModel):
    """Everything the loop needs; saved (resolved) in every checkpoint and beside the exported model."""

    output_dir: str = Field(description="Run folder: checkpoints/, tensorboard/, metrics.jsonl (and the export).")
    lr: float = Field(2e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    epochs: int = Field(1, ge=1, description="Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = Field(0, ge=0, description="Optimizer steps to run; 0: epochs x steps per epoch.")
    batch_size: int = Field(8, ge=1, description="Items (pairs for an RM) per micro-batch, per process.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip the global gradient norm to this; 0: no clipping.")
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps; 0: use warmup_ratio.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Warmup as a fraction of all steps (then cosine).")
    lr_schedule: Literal["cosine", "constant"] = Field(
        "cosine", description="After warmup: cosine decay to 0 over the run, or constant (common for PPO).")
    eval_every: int = Field(0, ge=0, description="Evaluate every N optimizer steps (and always at the end); 0: end only.")
    save_every: int = Field(0, ge=0, description="Checkpoint every N optimizer steps (and always at the end).")
    keep_checkpoints: int = Field(2, ge=0, description="Complete checkpoints to keep, newest first; 0: all.")
    log_every: int = Field(10, ge=1, description="Log averaged train metrics every N optimizer steps.")
    eval_batch_size: int = Field(0, ge=0, description="Items per eval batch; 0: 2 x batch_size.")
    seed: int = Field(42, ge=0, description="Seeds python, numpy, torch and the data order.")
    bf16: bool = Field(False, description="bf16 autocast (weights and optimizer state stay fp32).")
    lora: LoraSettings | None = Field(None, description="Train LoRA adapters instead of all weights.")
    resume: bool = Field(False, description="Continue from the newest complete checkpoint in output_dir.")
    threads: int = Field(0, ge=0, description="torch CPU threads; 0: torch's default.")
    progress: bool = Field(True, description="Show a progress bar (main process).")
    group_by_length: bool = Field(
        True, description="Batch items of similar length together (length-sorted megabatches, batch order shuffled: "
        "less padding, same items per epoch); used when the collator offers lengths(), see training/sampler.py.",
    )


@dataclass
class TrainState:
    """Where training stands; with the RNG states it is all a resume needs besides weights and optimizer."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    step_in_epoch: int = 0  # optimizer steps done within `epoch` (its micro-batches are step_in_epoch x grad_accum)
    world_size: int = 1
    num_items: int = 0  # training items: a resume must see the same data
    lengths_digest: str = ""  # fingerprint of the item lengths a length-grouped order uses ('' for random order)
