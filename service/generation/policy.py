"""Where a policy's weights are: a Hugging Face folder as is, or `smollm2` dequantized once from its GGUF.

vLLM 0.32 has no GGUF loader, so `smollm2` (the SmolLM2-135M-Instruct Q4_1 GGUF shipped as a package, see
rewardmodel/modeling.py) is dequantized by transformers into a float32 Hugging Face folder the first time it is
asked for, then reused. The folder lives under `$REWARDSERVE_CACHE` (default: the system temp directory), is
named after the GGUF's size and mtime, and is written atomically (a rename), so concurrent processes agree.
Its tokenizer ends the assistant's turn with `<|im_end|>` (eos in the tokenizer and the generation config).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger("rewardserve.generation")

SMOLLM2 = "smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("REWARDSERVE_CACHE") or tempfile.gettempdir()) / "rewardserve-policies"


def policy_dir(spec: str) -> Path:
    """`smollm2` or a Hugging Face causal-LM folder -> a folder both vLLM and transformers load."""
    if spec == SMOLLM2:
        return dequantized_smollm2()
    path = Path(spec).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"policy {spec!r} is not a Hugging Face model folder (no config.json) nor 'smollm2'")
    return path


def dequantized_smollm2() -> Path:
    from rewardmodel.modeling import SMOLLM2_GGUF, smollm2_dir

    gguf = smollm2_dir() / SMOLLM2_GGUF
    stat = gguf.stat()
    target = cache_root() / f"SmolLM2-135M-Instruct-f32-{stat.st_size}-{stat.st_mtime_ns}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        log.info("dequantizing %s into %s (once)", gguf.name, target)
        _write_dequantized(gguf, work)
        try:
            os.replace(work, target)
        except OSError:  # another process got there first
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _write_dequantized(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from rewardmodel.modeling import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(SMOLLM2))  # eos is <|im_end|>
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    set_eos(model, tokenizer)
    # the weights are plain float32 now; transformers still marks the model "GGUF-quantized", which it
    # refuses to save: drop the mark
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def set_eos(model: Any, tokenizer: Any) -> None:
    """The turn ends at the tokenizer's eos: make the model's configs say so too."""
    eos = tokenizer.eos_token_id
    for cfg in (model.config, model.generation_config):
        cfg.eos_token_id = eos
        cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        if tokenizer.bos_token_id is not None:
            cfg.bos_token_id = tokenizer.bos_token_id
