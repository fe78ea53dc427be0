"""Atomic checkpoints: a checkpoint directory either exists whole or not at all.

Layout under a run's `checkpoints/` folder:

    step-00000040/        a complete checkpoint (files below + manifest.json, written last)
    step-00000080/
    latest                "step-00000080\\n": the newest complete checkpoint, replaced atomically
    .tmp-step-00000120/   a checkpoint being written (or left by a crash): never loaded, removed on next save

Writing: every file goes into `.tmp-<name>/`; each file is fsynced; `manifest.json` (name, size and sha256 of every
file) is written last; the folder is fsynced and renamed to `<name>` (rename is atomic on POSIX within one
filesystem); the parent is fsynced; then `latest` is replaced atomically. A crash at any point leaves either the
previous state or the new one, plus at most a `.tmp-*` folder that nobody reads.

Reading: `find_latest` follows `latest` and verifies the manifest (sizes and hashes); when the pointer is missing or
points to a damaged folder it falls back to the newest folder that verifies, so a half-written checkpoint never loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

from training.types import TrainConfig, TrainState

log = logging.getLogger("rewardserve.checkpoint")
train_log = logging.getLogger("rewardserve.train")  # the loop's logger: save/resume messages keep their source

LATEST = "latest"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
EXTRA_STATE = "extra_state.json"  # a trainer's extra state (e.g. PPO's KL controller), see save_run
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def step_of(path: Path) -> int | None:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else None


# ------------------------------------------------------------------------------------------- durable writes


def fsync_path(path: Path) -> None:
    """fsync a file or a directory (directories: so that a rename or a new entry in them is durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old content or the new, never a torn file."""
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------- saving


def begin(root: Path, name: str) -> Path:
    """A fresh, empty temp folder for checkpoint `name` (a stale one from a crash is removed first)."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f"{TMP_PREFIX}{name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def temp_dir(root: Path, name: str) -> Path:
    return root / f"{TMP_PREFIX}{name}"


def commit(root: Path, name: str, keep: int = 0) -> Path:
    """Seal the temp folder of `name` (fsync + manifest), rename it into place, point `latest` at it, prune.

    keep: how many complete checkpoints to keep (the newest ones); 0 keeps all.
    """
    tmp = temp_dir(root, name)
    files = sorted(p for p in tmp.iterdir() if p.is_file() and p.name != MANIFEST)
    manifest = {"name": name, "files": {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
    for p in files:
        fsync_path(p)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    fsync_path(tmp / MANIFEST)
    fsync_path(tmp)
    final = root / name
    if final.exists():  # the same step saved again (e.g. after a resume): move the old one out of the way first
        old = root / f"{TMP_PREFIX}old-{name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write_text(root / LATEST, name + "\n")
    if keep > 0:
        prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    """Delete all but the `keep` newest complete checkpoints (never the one `latest` names)."""
    pointed = _read_pointer(root)
    done = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    for old in done[:-keep]:
        if old.name != pointed:
            shutil.rmtree(old, ignore_errors=True)


# -------------------------------------------------------------------------------------------------- loading


def verify(path: Path) -> str | None:
    """None when `path` is a complete checkpoint, else why not."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "no manifest.json (never committed)"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError) as exc:
        return f"unreadable manifest ({exc})"
    for fname, meta in files.items():
        f = path / fname
        if not f.is_file():
            return f"{fname} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{fname} has {f.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if _sha256(f) != meta["sha256"]:
            return f"{fname} does not match its sha256"
    return None


def _read_pointer(root: Path) -> str | None:
    try:
        return (root / LATEST).read_text().strip() or None
    except OSError:
        return None


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None. Damaged or half-written folders are skipped."""
    if not root.is_dir():
        return None
    pointed = _read_pointer(root)
    if pointed and _NAME.match(pointed):
        problem = verify(root / pointed)
        if problem is None:
            return root / pointed
        log.warning("checkpoint %s named by %s is unusable: %s; looking for an older one", pointed, LATEST, problem)
    candidates = sorted((p for p in root.iterdir() if p.is_dir() and step_of(p) is not None), key=step_of)
    for path in reversed(candidates):
        problem = verify(path)
        if problem is None:
            return path
        log.warning("skipping checkpoint %s: %s", path.name, problem)
    return None


def has_checkpoints(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() and step_of(p) is not None for p in root.iterdir())


# ---------------------------------------------------------------------------------- what a checkpoint holds
#
#   model.safetensors     the trainable parameters (all of them, or the LoRA weights + the head)
#   optimizer.pt          optimizer state      (main process)
#   scheduler.pt          LR scheduler state   (main process)
#   rng-<rank>.pt         python / numpy / torch (/ cuda) RNG states, one file per process
#   trainer_state.json    step, epoch, step within the epoch (the data position), world size, dataset size
#   config.json           the resolved run config (loop + trainer)
#   extra_state.json      a trainer's extra state, e.g. PPO's KL controller (main process; only if it has one)


def rng_state() -> dict:
    """Every RNG the training touches, in a form `torch.load(weights_only=True)` accepts."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(module) -> dict:
    """name -> detached CPU tensor for every parameter that trains (frozen base weights are not saved)."""
    return {n: p.detach().to("cpu").contiguous() for n, p in module.named_parameters() if p.requires_grad}


def write_state(tmp: Path, module, optimizer, scheduler, trainer_state: dict, config: dict, rank: int) -> None:
    """Fill the temp folder of a checkpoint; rank 0 writes the shared files, every rank its RNG file."""
    import torch
    from safetensors.torch import save_file

    if rank == 0:
        save_file(trainable_state(module), str(tmp / "model.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str) + "\n")
    torch.save(rng_state(), tmp / f"rng-{rank}.pt")


def read_state(path: Path, module, optimizer, scheduler, rank: int) -> dict:
    """Load a complete checkpoint into module/optimizer/scheduler and restore this rank's RNGs; the trainer state."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        missing, extra = sorted(expected - set(weights))[:5], sorted(set(weights) - expected)[:5]
        raise ValueError(f"{path}: trainable parameters differ from the model's (missing {missing}, unexpected {extra})")
    module.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    rng_file = path / f"rng-{rank}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path} has no RNG state for process {rank}: resume with the same number of processes")
    set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((path / "trainer_state.json").read_text())


# ------------------------------------------------------------------------------- the training loop's runs
#
# save_run / resume_run: what training.loop.train checkpoints and restores (paths under <output_dir>/checkpoints).


def _checkpoint_root(config: TrainConfig) -> Path:
    return Path(config.output_dir) / "checkpoints"


def _check_resume(saved: dict, config: TrainConfig) -> None:
    """A resume must replay the same data order: same seed, batch shape, processes and dataset size."""
    before = saved.get("train", {})
    for key in ("seed", "batch_size", "grad_accum"):
        if before.get(key) != getattr(config, key):
            raise ValueError(f"cannot resume exactly: {key} was {before.get(key)!r}, now {getattr(config, key)!r}")
    for key in ("max_steps", "epochs", "lr", "warmup_steps", "warmup_ratio"):
        if before.get(key) != getattr(config, key):
            train_log.warning("resuming with %s=%r (was %r): the LR schedule changes", key, getattr(config, key), before.get(key))


def save_run(accelerator, config: TrainConfig, model, optimizer, scheduler, state: TrainState, run_config: dict,
             extra_state: Any = None) -> None:
    """Checkpoint the run at `state.step` (all processes call it): model, optimizer, scheduler, RNGs, the data
    position, the resolved config (+ `run_config`) and `extra_state`; atomic, older ones pruned."""
    root, name = _checkpoint_root(config), checkpoint_name(state.step)
    if accelerator.is_main_process:
        begin(root, name)
    accelerator.wait_for_everyone()
    full_config = {"train": config.model_dump(mode="json"), **run_config}
    write_state(
        temp_dir(root, name), accelerator.unwrap_model(model), optimizer, scheduler, asdict(state),
        full_config, accelerator.process_index,
    )
    if accelerator.is_main_process and extra_state is not None:
        (temp_dir(root, name) / EXTRA_STATE).write_text(json.dumps(extra_state.state_dict(), indent=1) + "\n")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(root, name, keep=config.keep_checkpoints)
        train_log.info("saved checkpoint %s", root / name)
    accelerator.wait_for_everyone()


MODEL_KEYS = {"base_path": "--base", "policy_path": "--policy"}  # run_config keys naming the model trained from


def _check_same_model(saved: dict, run_config: dict | None, path: Path) -> None:
    """A resume must continue from the model the checkpoint was trained from (its weights are a delta of it)."""
    for key, flag in MODEL_KEYS.items():
        before, now = saved.get(key), (run_config or {}).get(key)
        if before is None or now is None:
            continue
        if Path(before).resolve() != Path(now).resolve():
            raise ValueError(f"cannot resume: the checkpoint {path} was trained from {flag} {before}, this run starts "
                             f"from {now}: give the same {flag}, or a new --output")


def resume_run(accelerator, config: TrainConfig, model, optimizer, scheduler, state: TrainState,
               extra_state: Any = None, run_config: dict | None = None) -> TrainState:
    """The state to start from: `state` (fresh run), or the newest complete checkpoint's, loaded into model,
    optimizer, scheduler, RNGs and `extra_state` after checking that it replays the same data order from the same
    model (run_config's base_path / policy_path against the checkpoint's)."""
    root = _checkpoint_root(config)
    if not config.resume:
        if has_checkpoints(root):
            raise ValueError(f"{root} already holds checkpoints: pass --resume to continue, or use a new output dir")
        return state
    path = find_latest(root)
    if path is None:
        train_log.warning("--resume: no complete checkpoint under %s; starting from scratch", root)
        return state
    _check_same_model(json.loads((path / "config.json").read_text()), run_config, path)  # the model first: the
    # data checks below would blame the data for a change of model (its tokenizer changes the item lengths)
    saved = type(state)(**json.loads((path / "trainer_state.json").read_text()))  # a TrainState
    if (saved.world_size, saved.num_items) != (state.world_size, state.num_items):
        raise ValueError(
            f"cannot resume exactly: the checkpoint saw {saved.num_items} items on {saved.world_size} processes, "
            f"this run has {state.num_items} on {state.world_size}"
        )
    if saved.lengths_digest != state.lengths_digest:
        raise ValueError(
            "cannot resume exactly: the data order differs from the checkpoint's (group_by_length, the data, or "
            "the item lengths, e.g. max_length, changed)"
        )
    _check_resume(json.loads((path / "config.json").read_text()), config)
    read_state(path, accelerator.unwrap_model(model), optimizer, scheduler, accelerator.process_index)
    if extra_state is not None:
        if not (path / EXTRA_STATE).is_file():
            raise ValueError(f"{path} has no {EXTRA_STATE}: it was not written by this trainer")
        extra_state.load_state_dict(json.loads((path / EXTRA_STATE).read_text()))
    train_log.info("resumed from %s at step %d (epoch %d, step %d of it)", path, saved.step, saved.epoch, saved.step_in_epoch)
    return saved
