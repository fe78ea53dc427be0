"""Causal-LM policies for DPO and PPO: loading, prompt/completion token ids, completion log-probs, export.

Token ids: a conversation is rendered with the tokenizer's chat template (or, without one, the plain
"\\n\\nHuman: ...\\n\\nAssistant: ..." format of rewardmodel.rendering) and tokenized without added special tokens. A
completion's ids are what the full conversation adds after the prompt rendered with its generation prompt: where the
two renderings first differ (as in TRL's DPOTrainer), so every prompt token is masked out of the log-probs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rewardmodel.modeling import ModelSource, load_tokenizer, resolve_model
from rewardmodel.rendering import render_plain
from training.rl_math import entropy_from_logits, token_logprobs

log = logging.getLogger("rewardserve.train.policy")

Message = dict[str, str]


# ------------------------------------------------------------------------------------------------- loading


def load_policy(spec: str, dtype: torch.dtype = torch.float32) -> tuple[Any, Any, ModelSource]:
    """(AutoModelForCausalLM in train mode without dropout, tokenizer, source) for smollm2 | a checkpoint folder."""
    from transformers import AutoModelForCausalLM

    from training.rm import disable_dropout, drop_dequantized_gguf_marker

    source = resolve_model(spec)
    tokenizer = load_tokenizer(source)
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": "sdpa"}
    if source.gguf_file:
        kwargs["gguf_file"] = source.gguf_file
    model = AutoModelForCausalLM.from_pretrained(str(source.path), **kwargs)
    drop_dequantized_gguf_marker(model)
    if getattr(model.config.get_text_config(), "final_logit_softcapping", None):
        raise ValueError(f"{source.path}: models with final_logit_softcapping are not supported")
    disable_dropout(model)
    check_causal(model, source.path)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id  # smollm2's GGUF names another EOS than the chat's
    return model.train(), tokenizer, source


@torch.no_grad()
def check_causal(model: Any, where: Any) -> None:
    """Refuse a model whose output at a position depends on later tokens (an encoder such as BERT, which
    AutoModelForCausalLM maps to BertLMHeadModel with bidirectional attention): a policy must be a decoder. Two rows
    that differ only in their last token must give the same logits at every earlier position."""
    vocab = int(model.config.get_text_config().vocab_size)
    ids = [vocab // 7, vocab // 5, vocab // 3, vocab // 2, vocab // 2 + 1]  # distinct ordinary ids, no special ones
    rows = torch.tensor([ids[:4], ids[:3] + ids[4:]], device=model.device)  # (2, 4): only the last token differs
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=rows, attention_mask=torch.ones_like(rows)).logits.float()  # (2, 4, V)
    finally:
        model.train(was_training)
    before = logits[:, :-1]  # (2, 3, V): positions before the changed token
    if not torch.allclose(before[0], before[1], rtol=1e-3, atol=1e-4):
        raise ValueError(f"{where} is not a causal language model: its {type(model).__name__} reads later tokens "
                         "(its logits at a position change with the tokens after it); DPO, PPO and GRPO need a "
                         "decoder-only policy, such as smollm2")


def frozen_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that never trains (the reference policy)."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def policy_and_reference(policy_spec: str, ref_spec: str | None, lora: Any) -> tuple[Any, Any, Any, Any, Any, Path]:
    """The trained policy and its frozen reference, shared by DPO and PPO.

    Returns (trained, ref, ref_context, tokenizer, peft model or None, policy path). The reference is the `ref_spec`
    model if given; else, with LoRA, the policy itself with its adapters off (ref None, ref_context the peft
    model's `disable_adapter`); else a frozen deep copy of the policy.
    """
    from training.loop import add_lora

    policy, tokenizer, source = load_policy(policy_spec)
    peft_model = add_lora(policy, lora, task_type="CAUSAL_LM") if lora else None
    if ref_spec is not None:
        ref, ref_context = frozen_copy(load_policy(ref_spec)[0]), None
    elif peft_model is not None:
        ref, ref_context = None, peft_model.disable_adapter
    else:
        ref, ref_context = frozen_copy(policy), None
    trained = peft_model.get_base_model() if peft_model is not None else policy
    return trained, ref, ref_context, tokenizer, peft_model, source.path


# ----------------------------------------------------------------------------------------------- token ids


def conversation_ids(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> list[int]:
    """Token ids of a conversation (chat template, else the plain format); [] for no messages."""
    if not messages:
        return []
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = render_plain(messages) + ("\n\nAssistant:" if add_generation_prompt else "")
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def prompt_ids(tokenizer: Any, messages: Sequence[Message], max_length: int) -> list[int]:
    """What a policy generates from: the prompt with the generation prompt, cut from the left to max_length."""
    ids = conversation_ids(tokenizer, messages, add_generation_prompt=True)
    return ids[-max_length:]


def all_prompt_ids(tokenizer: Any, prompts: Sequence[Sequence[Message]], max_length: int, name: Any = None
                   ) -> list[list[int]]:
    """prompt_ids of every prompt; how many were cut to max_length is logged, naming the source `name`."""
    out, cut = [], 0
    for messages in prompts:
        ids = conversation_ids(tokenizer, messages, add_generation_prompt=True)
        cut += len(ids) > max_length
        out.append(ids[-max_length:])
    report_cut(name, cut, len(out), "prompts", "--max-prompt-length", max_length)
    return out


def report_cut(name: Any, cut: int, total: int, what: str, flag: str, max_length: int) -> None:
    """Log how many of `total` items of the source `name` were cut to fit `flag` (nothing when none was)."""
    if cut:
        log.info("%s: %d of %d %s cut to %s %d", name if name is not None else "the given records", cut, total, what,
                 flag, max_length)


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def split_completions(tokenizer: Any, prompt: Sequence[Message], completions: Sequence[Sequence[Message]]
                      ) -> tuple[list[int], list[list[int]]]:
    """(shared prompt ids, ids of each completion); the completion starts where the renderings differ."""
    head = conversation_ids(tokenizer, prompt, add_generation_prompt=True)
    fulls = [conversation_ids(tokenizer, [*prompt, *c], add_generation_prompt=False) for c in completions]
    cut = min(common_prefix(head, full) for full in fulls)
    outs = [full[cut:] for full in fulls]
    eos = getattr(tokenizer, "eos_token_id", None)
    if not getattr(tokenizer, "chat_template", None) and eos is not None:  # plain format: teach the model to stop
        outs = [ids if ids[-1:] == [eos] else [*ids, eos] for ids in outs]
    return head[:cut], outs


def fit(prompt: list[int], completions: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """Fit prompt + each completion into max_length: the prompt loses its start first (down to half of max_length),
    then completions lose their ends."""
    longest = max(len(c) for c in completions)
    keep = max(max_length - longest, min(len(prompt), max_length // 2))
    prompt = prompt[len(prompt) - keep :] if keep < len(prompt) else prompt
    room = max_length - len(prompt)
    return prompt, [c[:room] for c in completions]


# ------------------------------------------------------------------------------------------------ log-probs


def backbone(model: Any) -> Any:
    return getattr(model, model.base_model_prefix)


def completion_logprobs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor,
    temperature: float = 1.0, with_entropy: bool = False, value_head: torch.nn.Module | None = None,
) -> dict[str, torch.Tensor]:
    """Per-token log-probs of the completion tokens of right-padded rows.

    input_ids, attention_mask, completion_mask: (B, T); completion_mask is 1 on completion tokens.
    Returns tensors (B, T - 1) aligned with the labels input_ids[:, 1:] (position p predicts token p + 1), zero
    where completion_mask[:, 1:] is 0: "logps"; "entropy" when asked; "values" (value_head on the hidden state
    that predicts each token) when a value head is given. Only the completion positions go through the LM head.
    """
    hidden = backbone(model)(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
    hidden = hidden[:, :-1]  # (B, T-1, H)
    mask = completion_mask[:, 1:].bool()  # (B, T-1)
    picked = hidden[mask]  # (N, H)
    logits = model.get_output_embeddings()(picked).float() / temperature  # (N, V)
    zeros = hidden.new_zeros(mask.shape, dtype=torch.float32)  # (B, T-1)
    out = {"logps": zeros.masked_scatter(mask, token_logprobs(logits, input_ids[:, 1:][mask]))}
    if with_entropy:
        with torch.no_grad():
            out["entropy"] = zeros.masked_scatter(mask, entropy_from_logits(logits.detach()))
    if value_head is not None:
        out["values"] = value_head(hidden).squeeze(-1).float() * mask  # (B, T-1)
    return out


# --------------------------------------------------------------------------------------------------- export


def export_policy(model: Any, tokenizer: Any, out: Path, extra_files: dict[str, str]) -> None:
    """A plain Hugging Face causal-LM checkpoint (fp32 safetensors, config, generation config, tokenizer with its
    chat template) plus extra files; config.json lands last, so a half-written export is no checkpoint."""
    from training.rm import _move_into

    tmp = out / ".tmp-export"
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.to(torch.float32).save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name, text in extra_files.items():
        (tmp / name).write_text(text)
    out.mkdir(parents=True, exist_ok=True)
    _move_into(tmp, out)


@torch.no_grad()
def check_export(reference: torch.Tensor, batch: dict[str, torch.Tensor], out: Path, tolerance: float = 1e-3) -> float:
    """Reload the export with plain transformers and compare completion log-probs with the training-time ones."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    got = completion_logprobs(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])["logps"]
    diff = float((got.sum(-1) - reference).abs().max())
    if diff > tolerance:
        raise RuntimeError(f"export check failed: reloaded log-probs differ from training-time ones by {diff:.3g}")
    log.info("export check: reloaded completion log-probs match (max |diff| %.2e)", diff)
    return diff
