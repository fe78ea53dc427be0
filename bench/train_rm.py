"""Reward-model training throughput: our trainer (training.rm / training.loop) vs TRL's RewardTrainer, side by side.

Every trainer trains its own copy of the same model (loaded from the same checkpoint, same seeded head, dropout
off) on the same N = steps x batch_size pairs (the first N of the data), with the same batch size (pairs per
step), max length, AdamW learning rate, gradient clipping and torch CPU threads, in one process. One measured
epoch each: every trainer sees every pair exactly once, in the order its own data pipeline picks:

- ours: what `training.loop.train` runs per optimizer step with grad_accum 1, in the loop's data order
  (`training.sampler.micro_batches`; length-grouped, the loop's default, since PreferenceCollator offers
  lengths): collate the kept token ids (PreferenceCollator, which encodes with rewardmodel.rendering.encode_input,
  left-truncating to max_length) -> rm_step (RewardModule -> reward_forward, Bradley-Terry: chosen and rejected
  in one forward of 2B rows, padded to the batch's longest) -> backward -> clip -> AdamW (fused) -> zero_grad.
- trl: RewardTrainer with its defaults: its own train DataLoader (random order, DataCollatorForPreference, one
  forward of 2B rows padded to the batch's longest), training_step (compute_loss with its metric gathering) ->
  clip -> the trainer's optimizer (adamw_torch_fused) -> zero_grad. TRL drops pairs longer than max_length
  instead of truncating them, so it gets the very token ids our encoder produced (`chosen_ids` / `rejected_ids`
  columns, used as they are): both train on identical tokens.
- optional (`--systems`): `ours-random` (ours with group_by_length off: random order, tokenizing every batch as
  the loop then does) and `trl-grouped` (TRL with train_sampling_strategy="group_by_length").

Tokenizing the data happens once before training in both (ours: PreferenceCollator.lengths; TRL: our ids are
handed to it), and is not timed. Each trainer first runs `--warmup` untimed steps; then the measured epochs run
interleaved, one step of each trainer in turn (the order rotating every step), so load from other processes
falls on all of them alike. `--repeats` measured epochs (new order each); ratios are medians over repeats.
Before training, both compute the loss of the same first batch from the same weights: `first_batch_loss_abs_diff`.

Texts are never printed. The last line of stdout is one JSON object; "vs_trl" = ours / trl pairs per second.

    python -m bench.train_rm --steps 30 --batch-size 8 --max-length 256 --warmup 2 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh_harmless" / "train.jsonl.gz"
SYSTEMS = ("ours", "trl", "ours-random", "trl-grouped")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a reward-model / HF checkpoint folder (default: MiniLM, rewardmodel.modeling.minilm_path)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="preference pairs (default: hh_harmless train)")
    p.add_argument("--steps", type=int, default=30, help="measured steps per trainer per epoch (default 30)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="token cap per side (default 256)")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per trainer (default 2)")
    p.add_argument("--repeats", type=int, default=1, help="measured epochs per trainer (default 1)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--systems", default="ours,trl", help=f"comma list of {', '.join(SYSTEMS)}; must hold ours and trl")
    args = p.parse_args(argv)
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown or not {"ours", "trl"} <= set(args.systems):
        p.error(f"--systems: need ours and trl, from {SYSTEMS}; got {args.systems}")
    if min(args.steps, args.batch_size, args.repeats) < 1 or args.warmup < 0:
        p.error("--steps, --batch-size and --repeats must be >= 1, --warmup >= 0")
    return args


class Runner:
    """One trainer: `epoch(e)` gives its steps for epoch e (callables that train one batch and return its
    (real tokens, padded tokens)); the steps of one epoch cover every pair once."""

    def __init__(self, name: str, epoch: Callable[[int], list[Callable[[], tuple[int, int]]]]):
        self.name, self.epoch = name, epoch
        self.seconds: list[float] = []  # per measured epoch
        self.real = self.padded = 0


def ours_runner(name: str, hf_model: Any, pairs: list, collate: Any, args: argparse.Namespace, grouped: bool) -> Runner:
    import torch

    from training.loop import TrainConfig, build_optimizer
    from training.rm import RewardModule, rm_step
    from training.sampler import item_lengths, micro_batches

    module = RewardModule(hf_model).train()
    optimizer = build_optimizer(module, TrainConfig(output_dir=".", lr=args.lr))
    params = [p for p in module.parameters() if p.requires_grad]
    lengths = item_lengths(collate, pairs) if grouped else None  # encodes every pair once (as the loop does)

    def step(idx: list[int]) -> tuple[int, int]:
        batch = collate([pairs[i] for i in idx])
        loss, _ = rm_step(module, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return int(batch.attention_mask.sum()), batch.attention_mask.numel()

    def epoch(e: int) -> list:
        return [lambda idx=idx: step(idx) for idx in micro_batches(len(pairs), args.batch_size, e, args.seed, lengths=lengths)]

    runner = Runner(name, epoch)
    runner.module = module
    return runner


def trl_runner(name: str, hf_model: Any, rows: list[dict], tokenizer: Any, max_length: int, args: argparse.Namespace,
               grouped: bool, tmp: str) -> Runner:
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    # grouped: TRL's LengthGroupedSampler reads the "length" column, which the default column pruning would remove
    extra = {"train_sampling_strategy": "group_by_length", "length_column_name": "length",
             "remove_unused_columns": False} if grouped else {}
    config = RewardConfig(
        output_dir=tmp, per_device_train_batch_size=args.batch_size, max_length=max_length, learning_rate=args.lr,
        max_grad_norm=1.0, disable_dropout=True, report_to=[], use_cpu=True, bf16=False, logging_strategy="no",
        save_strategy="no", seed=args.seed, **extra,
    )
    trainer = RewardTrainer(model=hf_model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    if len(trainer.train_dataset) != len(rows):
        raise SystemExit("TRL dropped pairs: the comparison would not be on the same data")
    torch.set_num_threads(args.threads)  # in case the trainer's setup changed it
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer.train's loop, which we step by hand
    loader = trainer.get_train_dataloader()  # its sampler: random (defaults) or LengthGroupedSampler
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def step(batches: Any) -> tuple[int, int]:
        batch = next(batches)  # TRL's collator runs here, inside the timed step (ours collates inside too)
        trainer.training_step(trainer.model, batch)
        trainer.accelerator.clip_grad_norm_(params, 1.0)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()

    def epoch(e: int) -> list:
        if hasattr(loader, "set_epoch"):
            loader.set_epoch(e)
        batches = iter(loader)
        return [lambda: step(batches) for _ in range(len(loader))]

    runner = Runner(name, epoch)
    runner.trainer = trainer
    return runner


def run_interleaved(runners: list[Runner], args: argparse.Namespace) -> None:
    """Warm-up (untimed), then `repeats` measured epochs, one step of each runner in turn."""
    import torch

    torch.set_num_threads(args.threads)
    for runner in runners:
        for fn in runner.epoch(10_000)[: args.warmup]:
            fn()
    for rep in range(args.repeats):
        steps = {r.name: r.epoch(rep) for r in runners}
        if len({len(s) for s in steps.values()}) != 1:
            raise SystemExit(f"trainers disagree on steps per epoch: { {k: len(v) for k, v in steps.items()} }")
        seconds = dict.fromkeys(steps, 0.0)
        for i in range(len(steps["ours"])):
            turn = runners[i % len(runners):] + runners[: i % len(runners)]  # rotate who goes first
            for runner in turn:
                started = time.perf_counter()
                real, padded = steps[runner.name][i]()
                seconds[runner.name] += time.perf_counter() - started
                runner.real, runner.padded = runner.real + real, runner.padded + padded
        for runner in runners:
            runner.seconds.append(seconds[runner.name])
        print(f"repeat {rep + 1}/{args.repeats}: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()),
              file=sys.stderr, flush=True)


def first_batch_loss_diff(ours: Runner, trl: Runner, pairs: list, collate: Any, rows: list[dict]) -> float:
    """Same weights, same first batch: our loss and TRL's compute_loss must agree (same model, same tokens)."""
    import torch

    from training.rm import rm_step

    n = min(4, len(pairs))
    with torch.no_grad():
        mine = float(rm_step(ours.module, collate(pairs[:n]))[0])
        batch = trl.trainer._prepare_inputs(trl.trainer.data_collator(rows[:n]))
        theirs = float(trl.trainer.compute_loss(trl.trainer.model, batch))
    return abs(mine - theirs)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for key, value in (("TOKENIZERS_PARALLELISM", "false"), ("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "1")):
        os.environ.setdefault(key, value)
    logging.disable(logging.WARNING)

    import torch
    import transformers
    import trl

    from rewardmodel.modeling import (
        load_reward_model,
        load_tokenizer,
        minilm_path,
        resolve_model,
    )
    from rewardmodel.rendering import model_max_length
    from training.data import PreferenceCollator, load_preferences
    from training.loop import seed_everything
    from training.rm import disable_dropout

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    source = resolve_model(args.model or str(minilm_path()))
    tokenizer = load_tokenizer(source)

    def fresh_model() -> Any:
        torch.manual_seed(args.seed)  # a checkpoint without a reward head gets the same random head every time
        model = load_reward_model(source, torch.float32, "cpu")
        disable_dropout(model)
        return model.train()

    max_length = model_max_length(tokenizer, fresh_model().config, args.max_length)
    pairs = load_preferences(args.data)[: args.steps * args.batch_size]
    if len(pairs) < args.steps * args.batch_size:
        raise SystemExit(f"{args.data} has {len(pairs)} pairs, fewer than steps x batch size")
    started = time.perf_counter()
    encoded = [PreferenceCollator(tokenizer, max_length).encode(p) for p in pairs]
    tokenize_s = time.perf_counter() - started
    rows = [{"chosen_ids": c.input_ids, "rejected_ids": r.input_ids, "length": max(c.tokens, r.tokens)} for c, r in encoded]

    tmp = tempfile.TemporaryDirectory(prefix="bench-train-rm-")
    runners = []
    for name in args.systems:
        if name.startswith("ours"):
            collate = PreferenceCollator(tokenizer, max_length)  # each its own: ours keeps ids, ours-random does not
            runners.append(ours_runner(name, fresh_model(), pairs, collate, args, grouped=name == "ours"))
            runners[-1].collate = collate
        else:
            runners.append(trl_runner(name, fresh_model(), rows, tokenizer, max_length, args, name == "trl-grouped",
                                      os.path.join(tmp.name, name)))
    by_name = {r.name: r for r in runners}
    loss_diff = first_batch_loss_diff(by_name["ours"], by_name["trl"], pairs, by_name["ours"].collate, rows)
    run_interleaved(runners, args)
    tmp.cleanup()

    pairs_per_epoch = args.steps * args.batch_size
    per_s = {r.name: [pairs_per_epoch / s for s in r.seconds] for r in runners}

    def ratio(a: str, b: str) -> float:
        return round(statistics.median(x / y for x, y in zip(per_s[a], per_s[b])), 4)

    summary = {
        "vs_trl": ratio("ours", "trl"),
        **({"ours_random_vs_trl": ratio("ours-random", "trl")} if "ours-random" in per_s else {}),
        **({"vs_trl_grouped": ratio("ours", "trl-grouped")} if "trl-grouped" in per_s else {}),
        "pairs_per_s": {k: round(statistics.median(v), 3) for k, v in per_s.items()},
        "pairs_per_s_by_repeat": {k: [round(x, 3) for x in v] for k, v in per_s.items()},
        "padding_efficiency": {r.name: round(r.real / r.padded, 4) for r in runners},  # real / computed tokens
        "first_batch_loss_abs_diff": loss_diff,
        "settings": {
            "model": args.model or "minilm (all-MiniLM-L6-v2)", "data": Path(args.data).name, "pairs": pairs_per_epoch, "steps": args.steps,
            "batch_size": args.batch_size, "max_length": max_length, "warmup": args.warmup, "repeats": args.repeats,
            "threads": args.threads, "lr": args.lr, "seed": args.seed, "systems": args.systems,
            "trl_sampler": "random (RewardTrainer default)", "ours_sampler": "length-grouped (loop default)",
            "tokenize_once_s": round(tokenize_s, 3), "tokenization_timed": False,
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "command": shlex.join(["python", "-m", "bench.train_rm", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
