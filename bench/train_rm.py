"""Reward-model training throughput: our step (training.rm / training.loop) vs TRL's RewardTrainer, side by side.

Both train the same model (two copies loaded from the same checkpoint, dropout off) on the same first N pairs of
the data, with the same batch size (pairs per step), max length, AdamW learning rate, gradient clipping and torch
CPU threads, in one process, alternating one step each (warm-up steps first, not timed).

- ours: exactly what `training.loop.train` runs per optimizer step with grad_accum 1: PreferenceCollator (which
  tokenizes with service.rendering.encode_input, left-truncating to max_length) -> rm_step (RewardModule ->
  reward_forward, Bradley-Terry) -> backward -> clip_grad_norm_ -> AdamW step -> zero_grad.
- TRL: RewardTrainer.training_step (its compute_loss, with its metric gathering) on batches from its own
  DataCollatorForPreference -> clip -> the trainer's AdamW step -> zero_grad. TRL drops pairs longer than
  max_length instead of truncating them, so it gets the very token ids our encoder produced (pre-tokenized
  `chosen_ids` / `rejected_ids` columns, which TRL uses as they are). Its timed step therefore does NOT include
  tokenization, while ours does (`ours_includes_tokenization` in the output): a conservative comparison for ours.

Texts are never printed. The last line of stdout is one JSON object with "vs_trl" = ours / TRL samples/s (pairs/s).

    python -m bench.train_rm --pairs 256 --batch-size 8 --max-length 256 --steps 20 --warmup 3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh_harmless" / "train.jsonl.gz"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a reward-model / HF checkpoint folder (default: MiniLM, service.modeling.minilm_path)")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="preference pairs (default: hh_harmless train)")
    p.add_argument("--pairs", type=int, default=256, help="use the first N pairs (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (default 8)")
    p.add_argument("--max-length", type=int, default=256, help="token cap per side (default 256)")
    p.add_argument("--steps", type=int, default=20, help="measured steps per trainer (default 20)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per trainer (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--lr", type=float, default=2e-5, help="AdamW learning rate (default 2e-5)")
    p.add_argument("--seed", type=int, default=42)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    logging.disable(logging.WARNING)

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    from service.modeling import (
        load_reward_model,
        load_tokenizer,
        minilm_path,
        resolve_model,
    )
    from service.rendering import model_max_length
    from training.data import PreferenceCollator, load_preferences
    from training.loop import TrainConfig, build_optimizer, seed_everything
    from training.rm import RewardModule, disable_dropout, rm_step

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    source = resolve_model(args.model or str(minilm_path()))
    tokenizer = load_tokenizer(source)

    def fresh_model():
        torch.manual_seed(args.seed)  # a checkpoint without a reward head gets the same random head both times
        model = load_reward_model(source, torch.float32, "cpu")
        disable_dropout(model)
        return model.train()

    ours_hf, trl_model = fresh_model(), fresh_model()
    max_length = model_max_length(tokenizer, ours_hf.config, args.max_length)
    pairs = load_preferences(args.data)[: args.pairs]
    if len(pairs) < args.batch_size:
        raise SystemExit(f"{len(pairs)} pairs make no batch of {args.batch_size}")
    collate = PreferenceCollator(tokenizer, max_length)

    # ---- ours
    ours = RewardModule(ours_hf).train()
    ours_opt = build_optimizer(ours, TrainConfig(output_dir=".", lr=args.lr))
    ours_params = [p for p in ours.parameters() if p.requires_grad]

    def ours_step(idx: list[int]) -> float:
        batch = collate([pairs[i] for i in idx])
        loss, _ = rm_step(ours, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ours_params, 1.0)
        ours_opt.step()
        ours_opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    # ---- TRL, on the very token ids our encoder produced
    encoded = [collate.encode(p) for p in pairs]
    rows = [{"chosen_ids": c.input_ids, "rejected_ids": r.input_ids} for c, r in encoded]
    tmp = tempfile.TemporaryDirectory(prefix="bench-train-rm-")
    config = RewardConfig(
        output_dir=tmp.name, per_device_train_batch_size=args.batch_size, max_length=max_length,
        learning_rate=args.lr, max_grad_norm=1.0, disable_dropout=True, report_to=[], use_cpu=True,
        bf16=False, logging_strategy="no", save_strategy="no", seed=args.seed, dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=trl_model, args=config, train_dataset=Dataset.from_list(rows),
                            processing_class=tokenizer)
    if len(trainer.train_dataset) != len(pairs):
        raise SystemExit("TRL dropped pairs: the comparison would not be on the same data")
    torch.set_num_threads(args.threads)  # in case the trainer's setup changed it
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # normally set by Trainer.train's loop, which we step by hand
    trl_opt, trl_collate = trainer.optimizer, trainer.data_collator
    trl_params = [p for p in trainer.model.parameters() if p.requires_grad]

    def trl_step(idx: list[int]) -> float:
        batch = trl_collate([trainer.train_dataset[i] for i in idx])
        loss = trainer.training_step(trainer.model, batch)
        trainer.accelerator.clip_grad_norm_(trl_params, 1.0)
        trl_opt.step()
        trl_opt.zero_grad(set_to_none=True)
        return float(loss)

    # ---- alternate, one step each; both see the same batches in the same order
    def batch_at(step: int) -> list[int]:
        start = (step * args.batch_size) % (len(pairs) - args.batch_size + 1)
        return list(range(start, start + args.batch_size))

    seconds = {"ours": 0.0, "trl": 0.0}
    losses = {"ours": [], "trl": []}
    for step in range(args.warmup + args.steps):
        idx = batch_at(step)
        order = (("ours", ours_step), ("trl", trl_step)) if step % 2 == 0 else (("trl", trl_step), ("ours", ours_step))
        for name, fn in order:
            started = time.perf_counter()
            loss = fn(idx)
            if step >= args.warmup:
                seconds[name] += time.perf_counter() - started
            losses[name].append(loss)
    tmp.cleanup()

    samples = args.steps * args.batch_size
    ours_sps, trl_sps = samples / seconds["ours"], samples / seconds["trl"]
    first_loss_diff = abs(losses["ours"][0] - losses["trl"][0])  # same weights, same tokens: same first loss
    summary = {
        "vs_trl": round(ours_sps / trl_sps, 4),
        "ours_samples_per_s": round(ours_sps, 3),
        "trl_samples_per_s": round(trl_sps, 3),
        "samples": "preference pairs (each step: 2 x batch_size rows)",
        "settings": {
            "model": str(source.path), "data": str(args.data), "pairs": len(pairs), "batch_size": args.batch_size,
            "max_length": max_length, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
            "lr": args.lr, "seed": args.seed, "ours_includes_tokenization": True, "trl_includes_tokenization": False,
        },
        "first_step_loss_abs_diff": first_loss_diff,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "command": shlex.join([sys.executable, "-m", "bench.train_rm", *(sys.argv[1:] if argv is None else argv)]),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
