"""Padding-free forward passes: sequences are concatenated into one row, attention runs per segment.

Padding is what makes batching slow on CPU (PERF_NOTES): a padded batch pays for longest x count tokens.
A packed batch pays only for its real tokens in every linear layer (the bulk of the FLOPs), and attention
runs once per segment with SDPA (no mask, no padding). The segment boundaries reach the attention function
through transformers' `cu_seq_lens_q` keyword, which every model forwards to its attention interface.

Supported heads: decoder heads (`model.score` on the last token) and BERT-style heads
(`base.pooler` on the first token + `model.classifier`). Other architectures fall back to padded batches.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from service.modeling import has_decoder_head

ATTN_NAME = "rewardserve_packed"
_registered = False


def _packed_attention(
    module: Any,
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, Hkv, T, D)
    value: torch.Tensor,  # (1, Hkv, T, D)
    attention_mask: Any,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if cu_seq_lens_q is None:
        raise RuntimeError("packed attention needs cu_seq_lens_q (segment boundaries)")
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    groups = query.shape[1] // key.shape[1]
    if groups > 1:  # grouped-query attention: repeat the key/value heads
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    bounds = cu_seq_lens_q.tolist()
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=causal
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    out = torch.cat(outs, dim=2)  # (1, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (1, T, H, D)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def register() -> str:
    """Register the packed attention (and a mask function that builds no mask) with transformers."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface

        AttentionInterface.register(ATTN_NAME, _packed_attention)
        AttentionMaskInterface.register(ATTN_NAME, _no_mask)
        _registered = True
    return ATTN_NAME


def head_kind(model: Any) -> str | None:
    """'decoder', 'bert' or None (not packable)."""
    if has_decoder_head(model):
        return "decoder"
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if hasattr(model, "classifier") and getattr(base, "pooler", None) is not None and model.config.model_type == "bert":
        return "bert"
    return None


def pack(batch: Sequence[Sequence[int]], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids (1, T), position_ids (1, T) restarting at each segment, cu_seqlens (N+1,)."""
    lengths = torch.tensor([len(ids) for ids in batch], dtype=torch.int32)
    cu = torch.zeros(len(batch) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lengths, 0)
    input_ids = torch.tensor([t for ids in batch for t in ids], dtype=torch.long).unsqueeze(0)
    positions = torch.cat([torch.arange(n) for n in lengths.tolist()]).unsqueeze(0)
    return input_ids.to(device), positions.to(device), cu.to(device)


def packed_reward_forward(model: Any, kind: str, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rewards (N,) float32 for N unpadded sequences in one packed forward pass."""
    device = next(model.parameters()).device
    input_ids, positions, cu = pack(batch, device)
    longest = int((cu[1:] - cu[:-1]).max())
    extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    base = getattr(model, model.base_model_prefix)
    if kind == "decoder":
        hidden = base(input_ids=input_ids, position_ids=positions, **extra).last_hidden_state[0]  # (T, H)
        return model.score(hidden[cu[1:].long() - 1])[:, 0].float()  # last token of each segment
    token_types = torch.zeros_like(input_ids)
    hidden = base.encoder(
        base.embeddings(input_ids=input_ids, position_ids=positions, token_type_ids=token_types),
        attention_mask=None, position_ids=positions, **extra,
    ).last_hidden_state[0]  # (T, H)
    first = hidden[cu[:-1].long()].unsqueeze(1)  # (N, 1, H): the [CLS] of each segment
    return model.classifier(model.dropout(base.pooler(first)))[:, 0].float()
