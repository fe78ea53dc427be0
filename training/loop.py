"""The one training loop: every trainer (RM now; DPO, PPO later) hands it a model and a step function.

    step_fn(model, batch) -> (loss, metrics)      loss: scalar mean over the micro-batch; metrics: 0-dim tensors

The loop owns everything else: seeded data order, gradient accumulation, clipping, warmup + cosine LR, bf16
autocast, periodic eval, atomic checkpoints and exact resume (training/checkpoint.py), progress bar, TensorBoard +
metrics.jsonl (training/run_log.py).
`accelerate` places the model, wraps it for DDP when launched with several processes, and autocasts; a plain
`python` process works the same (one process, no DDP).

Data order is ours, not a DataLoader's (training/sampler.py): epoch e visits the items in
`numpy.random.default_rng([seed, e])` order (length-grouped when `group_by_length` is on and the collator offers
`lengths(items)`), cut into micro-batches of `batch_size` per process and grouped `grad_accum` at a time into steps.
The position in the data is therefore just (epoch, optimizer step within the epoch), which a checkpoint stores, and
a resumed run replays the very same micro-batches with the very same RNG states as a run that never stopped.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training import checkpoint as ckpt
from training.types import (  # noqa: F401  (re-exported: trainers import them from here)
    LoraSettings, Metrics, RolloutFn, StepFn, TrainConfig, TrainingDiverged, TrainingInterrupted, TrainState, Update,
)
from training.run_log import RunLog, Window
from training.sampler import item_lengths, lengths_digest, micro_batches

log = logging.getLogger("rewardserve.train")

@dataclass
class LoopResult:
    model: torch.nn.Module  # unwrapped (no DDP, no autocast wrapper), on the training device
    state: TrainState
    train_metrics: dict[str, float] = field(default_factory=dict)  # last logged window
    eval_metrics: dict[str, float] = field(default_factory=dict)  # last evaluation
    last_loss: float = float("nan")  # loss of the last optimizer step (this process)
    is_main: bool = True
    accelerator: Any = None


# --------------------------------------------------------------------------------------------- small pieces


TRAIN_FLAGS = (
    "lr", "weight_decay", "epochs", "max_steps", "batch_size", "grad_accum", "max_grad_norm", "warmup_steps",
    "warmup_ratio", "lr_schedule", "eval_every", "save_every", "keep_checkpoints", "log_every", "eval_batch_size",
    "seed", "bf16", "resume", "threads", "group_by_length",
)
"""TrainConfig fields that `train rm|dpo|ppo` take from flags of the same name."""


def given_flags(args: Any, names: Sequence[str]) -> dict[str, Any]:
    """The flags among `names` that were given (argparse leaves the others None, so defaults stay the config's)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


LORA_FLAGS = ("lora_r", "lora_alpha", "lora_dropout", "lora_targets")
EVAL_FLAGS = ("eval_every", "eval_batch_size")


def flag_of(name: str) -> str:
    """An argparse destination as its flag: lora_r -> --lora-r."""
    return "--" + name.replace("_", "-")


def refuse_orphan_flags(args: Any) -> None:
    """A flag that only means something beside another one is refused without it, not ignored: the --lora-* flags
    need --lora; --eval-every and --eval-batch-size need --eval (in the commands that take --eval)."""
    orphans = [] if getattr(args, "lora", None) else [f"{flag_of(n)} needs --lora" for n in
                                                       given_flags(args, LORA_FLAGS)]
    if hasattr(args, "eval") and not args.eval:
        orphans += [f"{flag_of(n)} needs --eval (there is no eval set)" for n in given_flags(args, EVAL_FLAGS)]
    if orphans:
        raise ValueError(f"{orphans[0]}: add it, or drop the flag")


def train_config_from_args(args: Any, defaults: dict[str, Any] | None = None) -> TrainConfig:
    """The loop's flags (plus --output, --no-progress and the --lora group) -> TrainConfig; `defaults` are a
    trainer's own defaults, which given flags override."""
    refuse_orphan_flags(args)
    train = dict(defaults or {}) | given_flags(args, TRAIN_FLAGS)
    check_output_dir(args.output)  # before any model is loaded
    train |= {"output_dir": args.output, "progress": not args.no_progress}
    if args.lora:
        lora = {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                "target_modules": args.lora_targets.split(",") if args.lora_targets else None}
        train["lora"] = LoraSettings(**{k: v for k, v in lora.items() if v is not None})
    return TrainConfig(**train)


def check_output_dir(output_dir: Any, model_path: Any = None, flag: str = "--base") -> None:
    """Refuse an --output that is an existing file, or the very folder of the model being trained from (`model_path`,
    given as `flag`): the export would overwrite that model. Paths are compared resolved (links, '..')."""
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--output {out} is a file, not a folder: give a new folder (or a run's folder)")
    if model_path is not None and out.resolve() == Path(model_path).resolve():
        raise ValueError(f"--output {out} is the model being trained from ({flag} {model_path}): the export would "
                         "overwrite it; give another folder")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(num_items: int, config: TrainConfig, world: int = 1) -> int:
    return math.ceil(len(micro_batches(num_items, config.batch_size, 0, config.seed, world)) / config.grad_accum)


def total_steps(num_items: int, config: TrainConfig, world: int = 1) -> int:
    return config.max_steps or config.epochs * steps_per_epoch(num_items, config, world)


def warmup_steps(config: TrainConfig, total: int) -> int:
    return config.warmup_steps or math.ceil(config.warmup_ratio * total)


def to_device(batch: Any, device: torch.device) -> Any:
    if hasattr(batch, "to"):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def add_lora(model: torch.nn.Module, settings: LoraSettings, task_type: str = "SEQ_CLS") -> Any:
    """Wrap a transformers model with LoRA adapters (peft); SEQ_CLS keeps the score/classifier head trainable."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.error import NoMatchingPeftModuleError

    config = LoraConfig(
        task_type=task_type, r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
        target_modules=settings.target_modules, modules_to_save=settings.modules_to_save,
    )
    try:
        return get_peft_model(model, config)
    except NoMatchingPeftModuleError:  # a ValueError: the command reports it as one line
        names = sorted({n.rpartition(".")[2] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        asked = f"--lora-targets {','.join(settings.target_modules)}" if settings.target_modules else "LoRA"
        raise ValueError(f"{asked}: no module of {type(model).__name__} matches; its linear layers are named "
                         f"{', '.join(names)}") from None


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters; no weight decay on biases and norm weights (1-D tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.device.type in ("cpu", "cuda") for p in params)  # one kernel for all tensors (TRL's default too)
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr, fused=fused)


# ------------------------------------------------------------------------------------------------ evaluation


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, data: Sequence, collate: Callable, step_fn: StepFn, batch_size: int, accelerator: Any
) -> dict[str, float]:
    """Item-weighted means of the loss and of every step metric over `data` (sharded across processes)."""
    if not data:
        return {}
    model = accelerator.unwrap_model(model)  # no DDP forward: processes may run different numbers of batches
    was_training = model.training
    model.eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    if world > 1 and len(data) < world:
        raise ValueError(f"the eval set has {len(data)} items, fewer than the {world} processes")
    shard = list(range(rank, len(data), world))
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(shard), batch_size):
        idx = shard[start : start + batch_size]
        batch = to_device(collate([data[i] for i in idx]), accelerator.device)
        with accelerator.autocast():
            loss, metrics = step_fn(model, batch)
        for key, value in {"loss": loss, **metrics, "_items": torch.tensor(1.0)}.items():
            sums[key] = sums.get(key, 0.0) + value.detach().float().to(accelerator.device) * len(idx)
    model.train(was_training)
    keys = sorted(sums)
    totals = accelerator.reduce(torch.stack([sums[k] for k in keys]), reduction="sum")  # (K,)
    values = dict(zip(keys, totals.tolist()))
    items = values.pop("_items")
    return {f"eval/{k}": v / items for k, v in values.items()}


# ------------------------------------------------------------------------------------------------- the loop


def check_finite(accelerator: Any, step: int, worst_loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
    """Raise TrainingDiverged when a micro-batch loss or the gradient norm is NaN or infinite (on any process),
    before the optimizer step: one host sync per update, and a collective only with several processes."""
    values = torch.stack([worst_loss.detach().float(), torch.as_tensor(grad_norm, dtype=torch.float32,
                                                                       device=worst_loss.device)])  # (2,)
    bad = (~torch.isfinite(values)).float()  # (2,) 1 where non-finite
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    loss_bad, norm_bad = (bool(b) for b in bad.tolist())
    if loss_bad or norm_bad:
        what = "loss" if loss_bad else "gradient norm"
        raise TrainingDiverged(
            f"step {step}: the {what} is {float(values[0 if loss_bad else 1])} (not finite); stopped before the "
            "optimizer step, no model exported: check the data (margins, labels) or lower --lr")


def _update(accelerator, model, params, optimizer, config: TrainConfig, step_fn: StepFn, update: Update,
            window: Window, count: bool = True, step: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer update over micro-batches; gradients are item-weighted means. (last loss, grad norm)
    A non-finite loss or gradient norm raises TrainingDiverged instead of stepping (`step`, 1-based: for the
    message)."""
    total_items = sum(items for _, items in update)
    worst = None  # the first non-finite micro-batch loss, else the last loss (a 0-dim tensor: no sync per micro-batch)
    for i, (batch, items) in enumerate(update):
        batch = to_device(batch, accelerator.device)  # rollout experience may come from another device
        last = i == len(update) - 1
        with nullcontext() if last else accelerator.no_sync(model):  # DDP all-reduces on the last only
            with accelerator.autocast():
                loss, metrics = step_fn(model, batch)  # loss: mean over this micro-batch
            accelerator.backward(loss * (items / total_items))
        detached = loss.detach().float()
        worst = detached if worst is None else torch.where(torch.isfinite(worst), detached, worst)
        window.add({"loss": loss, **metrics}, items, count)
    grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm or float("inf"))
    check_finite(accelerator, step, worst, grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm


def make_accelerator(config: TrainConfig) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # Accumulation is done by hand below (no_sync + weighted losses) so the data position stays exact on resume.
    # AcceleratorState is a process-wide singleton that refuses a second mixed-precision setting; forget it
    # between runs in one process (tests, notebooks). The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    # Several processes and no GPU (torchrun / accelerate launch on CPU): accelerate wants cpu=True to use gloo DDP.
    cpu_ddp = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(mixed_precision="bf16" if config.bf16 else "no", cpu=cpu_ddp)


SHARDED = ("FSDP", "DEEPSPEED", "MEGATRON_LM")  # accelerate distributed types this loop refuses (docs/training.md)


def check_distributed(accelerator: Any) -> None:
    """One process or DDP only: with sharded weights or optimizer state, this loop's checkpoints and export
    (unwrap_model, per-tensor state, rank-0 optimizer state) would hold shards, not the model."""
    kind = getattr(accelerator.distributed_type, "value", str(accelerator.distributed_type))
    if kind in SHARDED:
        raise ValueError(
            f"rewardserve's training loop supports one process or DDP, not {kind}: its checkpoints and export do not "
            "gather sharded state yet. Use a DDP config (training/configs/ddp_*.yaml); see docs/training.md."
        )


def train(
    config: TrainConfig,
    model: torch.nn.Module,
    train_data: Sequence,
    collate: Callable[[list], Any],
    step_fn: StepFn,
    eval_data: Sequence | None = None,
    run_config: dict | None = None,
    rollout: RolloutFn | None = None,
    extra_state: Any = None,
) -> LoopResult:
    """Train `model` with `step_fn` on `train_data`; returns the trained (unwrapped) model and the last metrics.

    rollout: called once per step with the step's collated micro-batches [(batch, items)]; returns the optimizer
        updates to run (each a list of (micro-batch, items) for step_fn, accumulated into one optimizer step) and
        metrics to log. PPO turns prompts into rollouts and runs ppo_epochs x minibatches updates this way; the
        LR schedule still advances once per step.
    extra_state: an object with state_dict() -> JSON-able dict and load_state_dict(dict) (e.g. a KL controller),
        saved in every checkpoint (extra_state.json) and restored on resume.
    """
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    if config.threads:
        torch.set_num_threads(config.threads)
    check_output_dir(config.output_dir)
    accelerator = make_accelerator(config)
    check_distributed(accelerator)
    world, rank = accelerator.num_processes, accelerator.process_index
    if steps_per_epoch(len(train_data), config, world) == 0:
        raise ValueError(f"{len(train_data)} training items make no batch of {config.batch_size} on {world} process(es)")
    total = total_steps(len(train_data), config, world)
    seed_everything(config.seed)

    model.train()
    optimizer = build_optimizer(model, config)
    if config.lr_schedule == "constant":
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup_steps(config, total))
    else:
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup_steps(config, total), total)
    model, optimizer = accelerator.prepare(model, optimizer)  # the scheduler is stepped by us, once per step
    lengths = item_lengths(collate, train_data) if config.group_by_length else None  # (N,) or None: random order
    state = TrainState(world_size=world, num_items=len(train_data), lengths_digest=lengths_digest(lengths))
    state = ckpt.resume_run(accelerator, config, model, optimizer, scheduler, state, extra_state, run_config)  # restores the RNGs: nothing random after
    runlog = RunLog(Path(config.output_dir), config, total, state, enabled=accelerator.is_main_process)
    params = [p for p in model.parameters() if p.requires_grad]
    result = LoopResult(accelerator.unwrap_model(model), state, is_main=accelerator.is_main_process, accelerator=accelerator)
    run_evaluation = partial(evaluate, model, eval_data, collate, step_fn, config.eval_batch_size or 2 * config.batch_size, accelerator)
    window = Window()
    last_saved = state.step if state.step else None  # the step of the newest checkpoint of this run

    try:
        while state.step < total:
            groups = micro_batches(len(train_data), config.batch_size, state.epoch, config.seed, world, rank, lengths)
            groups = [groups[i : i + config.grad_accum] for i in range(0, len(groups), config.grad_accum)]
            for group in groups[state.step_in_epoch :]:
                # ---- one optimizer step over grad_accum micro-batches; gradients are item-weighted means
                started = time.perf_counter()
                batches = [(to_device(collate([train_data[j] for j in idx]), accelerator.device), len(idx))
                           for idx in group]
                updates = [batches]  # one optimizer update over the grad_accum micro-batches
                if rollout is not None:  # e.g. PPO: the batches become experience for several optimizer updates
                    updates, rollout_metrics = rollout(model, batches)
                    window.add(rollout_metrics, sum(items for _, items in batches))
                for update in updates:
                    loss, grad_norm = _update(accelerator, model, params, optimizer, config, step_fn, update, window,
                                              count=rollout is None, step=state.step + 1)
                lr = scheduler.get_last_lr()[0]  # the rate this step used
                scheduler.step()
                state.step += 1
                state.step_in_epoch += 1
                window.seconds += time.perf_counter() - started
                window.steps += 1
                runlog.advance()

                # ---- log, evaluate, save
                done = state.step == total
                if done or state.step % config.log_every == 0:
                    extra = {"lr": lr, "grad_norm": float(grad_norm),
                             "epoch": state.epoch + state.step_in_epoch / len(groups)}
                    result.train_metrics = window.flush(accelerator) | extra
                    runlog.write(state.step, result.train_metrics)
                if eval_data and (done or (config.eval_every and state.step % config.eval_every == 0)):
                    result.eval_metrics = run_evaluation()
                    runlog.write(state.step, result.eval_metrics)
                if done or (config.save_every and state.step % config.save_every == 0):
                    ckpt.save_run(accelerator, config, model, optimizer, scheduler, state, dict(run_config or {}),
                                  extra_state)
                    last_saved = state.step
                if done:
                    result.last_loss = float(loss.detach())  # the final step's last micro-batch loss
                    break
            else:  # the epoch ran out: next epoch
                state.epoch += 1
                state.step_in_epoch = 0
    except TrainingDiverged:
        runlog.close()  # the bar and TensorBoard end here; nothing of the failed step was saved
        raise
    except KeyboardInterrupt:  # Ctrl-C: say where the run stood (the command prints it as one line)
        runlog.close()
        raise TrainingInterrupted(state.step, total, last_saved) from None

    if eval_data and not result.eval_metrics:  # resumed a run that had already finished
        result.eval_metrics = run_evaluation()
    runlog.close()
    result.model = accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # a plain module again: no autocast
    accelerator.wait_for_everyone()
    return result
