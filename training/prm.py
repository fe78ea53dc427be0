"""Process-reward-model training: `rewardserve train prm` (TRL stepwise data -> a PRM checkpoint that `serve` loads).

The convention is rewardmodel/steps.py's (TRL PRMTrainer's): ids = [BOS] + prompt + (step + separator)..., every
example encoded by `encode_steps` (training/prm_batch.py), the step read at the last token of its piece, a two-label
(bad, good) token-classification head trained with cross-entropy at the step ends only (training/prm_loss.py), and a
step's raw score = logit[good] - logit[bad] (`step_scores`). Training runs in the one loop (training/loop.py:
accelerate, checkpoints, exact resume, TensorBoard + metrics.jsonl), like `train rm`.

The output folder is a plain Hugging Face checkpoint (`AutoModelForTokenClassification.from_pretrained(out)` works;
LoRA is merged first) plus:
    rewardserve_prm.json   the PRMSpec: step separator, labels, which one is good
    training_config.json   the resolved config, final metrics, library versions, the export check
    checkpoints/ tensorboard/ metrics.jsonl   from the loop
The export is checked the way a server reads it: reloaded, the examples re-encoded with the saved tokenizer and the
saved separator, its step scores must equal the training-time ones.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from pydantic import BaseModel, Field

from rewardmodel.modeling import load_tokenizer, resolve_model
from rewardmodel.rendering import model_max_length
from rewardmodel.steps import DEFAULT_SEPARATOR, PRM_META, PRMSpec
from training import loop
from training.checkpoint import atomic_write_text
from training.data import require_records
from training.loop import TrainConfig, given_flags, train_config_from_args
from training.prm_batch import StepBatch, StepCollator, StepExample, encode_example, encode_examples, load_stepwise, pad_id
from training.prm_loss import batch_step_scores, prm_loss
from training.prm_model import PRMModule, forward_logits, freeze_base, load_base, load_prm
from training.rm import _versions, disable_dropout, export

log = logging.getLogger("rewardserve.train.prm")

EXPORT_CHECK_EXAMPLES = 8
EXPORT_CHECK_TOLERANCE = 1e-3


class PRMConfig(BaseModel):
    """A process-reward-model run: what to train on, and the loop's settings."""

    base: str = Field("minilm", description="minilm | smollm2 | a Hugging Face checkpoint folder.")
    data: str = Field(description="Training data in TRL's stepwise format (prompt, completions, labels).")
    eval: str | None = Field(None, description="Eval data (same format): periodic eval and the export check.")
    max_length: int = Field(512, ge=8, description="Token cap per example (the model's own limit also applies).")
    step_separator: str = Field(DEFAULT_SEPARATOR, min_length=1, description="Appended to every step; its last "
                                "token is where the step is read.")
    train_on_last_step_only: bool = Field(False, description="Only the last step's label is trained (as TRL).")
    freeze_base: bool = Field(False, description="Train only the token-classification head; the base stays frozen.")
    num_layers: int | None = Field(None, ge=1, description="Keep only the base's first N layers (decoder bases).")
    disable_dropout: bool = Field(True, description="Turn dropout off in the base model.")
    train: TrainConfig


@dataclass
class PRMResult:
    output_dir: Path
    module: torch.nn.Module  # the trained PRMModule (LoRA merged), eval mode
    spec: PRMSpec
    train_metrics: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    is_main: bool = True


def prm_step(model: torch.nn.Module, batch: StepBatch, spec: PRMSpec) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy at the labelled step ends of B examples, one forward."""
    logits = model(batch.input_ids, batch.attention_mask)  # (B, T, C)
    return prm_loss(logits, batch.labels, spec)


def trainer_step_scores(module: torch.nn.Module, batch: StepBatch, spec: PRMSpec) -> list[torch.Tensor]:
    """Per example, its raw step scores (n_steps,) as the trainer computes them (batched, right-padded)."""
    return batch_step_scores(forward_logits(module, batch), batch.step_mask, spec)


# -------------------------------------------------------------------------------------------------- export


def export_prm(model: Any, tokenizer: Any, max_length: int, spec: PRMSpec, out: Path, summary: dict) -> None:
    """training.rm.export (atomic HF checkpoint + tokenizer capped at max_length) with rewardserve_prm.json."""
    with tempfile.TemporaryDirectory() as tmp:
        spec.save(tmp)
        spec_text = (Path(tmp) / PRM_META).read_text()
    export(model, tokenizer, max_length, out, {PRM_META: spec_text,
                                               "training_config.json": json.dumps(summary, indent=2) + "\n"})


def check_export(reference: list[torch.Tensor], reference_ids: list[list[int]], examples: Sequence[StepExample],
                 out: Path, spec: PRMSpec) -> float:
    """Reload the export as a server would (model, tokenizer, spec), re-encode `examples`: same ids, same scores."""
    model, tokenizer, saved, max_length = load_prm(str(out))
    if saved != spec:
        raise RuntimeError(f"export check failed: {PRM_META} reads {saved}, training used {spec}")
    items = [encode_example(tokenizer, ex, max_length, saved.step_separator) for ex in examples]
    if [it.input_ids if it else None for it in items] != reference_ids:
        raise RuntimeError("export check failed: the saved tokenizer encodes the check examples differently")
    got = trainer_step_scores(model, StepCollator(pad_id(tokenizer))([it for it in items if it]), saved)
    diff = max((float((g - r).abs().max()) for g, r in zip(got, reference)), default=0.0)
    if diff > EXPORT_CHECK_TOLERANCE:
        raise RuntimeError(f"export check failed: reloaded step scores differ from training-time ones by {diff:.3g}")
    log.info("export check: reloaded step scores match training-time ones (max |diff| %.2e)", diff)
    return diff


# --------------------------------------------------------------------------------------------------- train


def _prepare_model(config: PRMConfig, hf_model: Any) -> tuple[PRMModule, Any]:
    """(the module the loop trains, the peft wrapper or None): dropout, frozen base or LoRA."""
    if config.disable_dropout:
        disable_dropout(hf_model)
    if config.freeze_base and config.train.lora:
        raise ValueError("freeze_base and LoRA exclude each other: pick one")
    if config.freeze_base:
        log.info("base frozen: training the head's %d parameters", freeze_base(hf_model))
    peft_model = loop.add_lora(hf_model, config.train.lora, task_type="TOKEN_CLS") if config.train.lora else None
    return PRMModule(peft_model.get_base_model() if peft_model is not None else hf_model), peft_model


def train_prm(config: PRMConfig) -> PRMResult:
    """Train a PRM, export it to config.train.output_dir, return the trained module and metrics."""
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    loop.seed_everything(config.train.seed)
    spec = PRMSpec(step_separator=config.step_separator)
    examples = require_records(load_stepwise(config.data), config.data, "--data")  # the data first: quick errors
    eval_examples = require_records(load_stepwise(config.eval), config.eval, "--eval") if config.eval else []
    source = resolve_model(config.base)
    loop.check_output_dir(config.train.output_dir, source.path, "--base")
    tokenizer = load_tokenizer(source)
    hf_model = load_base(source, spec, config.train.seed, config.num_layers)
    max_length = model_max_length(tokenizer, hf_model.config, config.max_length)
    encode = partial(encode_examples, tokenizer, max_length=max_length, separator=spec.step_separator)
    items, eval_items = encode(examples, what="train data"), encode(eval_examples, what="eval data") if eval_examples else None
    log.info("training a PRM over %s on %d examples (eval: %s), max_length %d", source.path, len(items),
             len(eval_items) if eval_items else "none", max_length)
    module, peft_model = _prepare_model(config, hf_model)
    collate = StepCollator(pad_id(tokenizer), config.train_on_last_step_only)
    run_config = {"prm": config.model_dump(mode="json", exclude={"train"}), "resolved_max_length": max_length,
                  "base_path": str(source.path)}

    result = loop.train(config.train, module, items, collate, partial(prm_step, spec=spec), eval_items, run_config)

    out = Path(config.train.output_dir)
    if result.is_main:
        module = result.model.eval()
        check = (eval_examples or examples)[:EXPORT_CHECK_EXAMPLES]
        check_items = [encode_example(tokenizer, ex, max_length, spec.step_separator) for ex in check]
        reference = trainer_step_scores(module, collate([it for it in check_items if it]), spec)  # before any merge
        merged = peft_model.merge_and_unload() if peft_model is not None else module.model  # in place
        summary = {**run_config, "spec": asdict(spec), "train": config.train.model_dump(mode="json"),
                   "versions": _versions(), "final_train_metrics": result.train_metrics,
                   "final_eval_metrics": result.eval_metrics, "steps": result.state.step}
        export_prm(merged, tokenizer, max_length, spec, out, summary)
        summary["export_check_max_abs_diff"] = check_export(
            reference, [it.input_ids if it else None for it in check_items], check, out, spec)
        atomic_write_text(out / "training_config.json", json.dumps(summary, indent=2) + "\n")
        log.info("exported process reward model to %s", out)
    result.accelerator.wait_for_everyone()
    return PRMResult(out, result.model, spec, result.train_metrics, result.eval_metrics, result.is_main)


# ------------------------------------------------------------------------------------------------------ CLI

_PRM_FLAGS = ("base", "data", "eval", "max_length", "train_on_last_step_only", "freeze_base", "num_layers",
              "disable_dropout")
_ESCAPES = {"\\n": "\n", "\\t": "\t", "\\\\": "\\"}


def unescape(text: str) -> str:
    """`\\n`, `\\t` and `\\\\` typed on a command line -> the characters (a separator is often a newline)."""
    out, i = [], 0
    while i < len(text):
        pair = text[i : i + 2]
        if pair in _ESCAPES:
            out.append(_ESCAPES[pair])
            i += 2
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def config_from_args(args: Any) -> PRMConfig:
    """`rewardserve train prm` flags -> PRMConfig; flags left out keep the config's defaults."""
    given = given_flags(args, _PRM_FLAGS)
    if getattr(args, "step_separator", None) is not None:
        given["step_separator"] = unescape(args.step_separator)
    return PRMConfig(**given, train=train_config_from_args(args))


def main(args: Any) -> int:
    result = train_prm(config_from_args(args))
    if not result.is_main:
        return 0
    acc = result.eval_metrics.get("eval/step_accuracy")
    print(f"process reward model saved to {result.output_dir}" + (f" (eval step accuracy {acc:.4f})" if acc is not None else ""))
    return 0
