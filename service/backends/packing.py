"""Padding-free forward passes: sequences are concatenated into one row, attention runs per segment.

Padding is what makes batching slow on CPU (PERF_NOTES): a padded batch pays for longest x count tokens.
A packed batch pays only for its real tokens in every linear layer (the bulk of the FLOPs), and attention
runs once per segment with SDPA (no mask, no padding). The segment boundaries reach the attention function
through transformers' `cu_seq_lens_q` keyword, which every model forwards to its attention interface.

Supported heads: decoder heads (`model.score` on the last token) and BERT-style heads
(`base.pooler` on the first token + `model.classifier`). Other architectures fall back to padded batches.

Shared prefixes (decoder heads only; see service/grouping.py): a pass is laid out as a radix tree of its inputs,
each shared run of tokens packed ONCE, then what follows it, with positions continuing: e.g. [system header,
prompt 1, answer 1a, answer 1b, prompt 2, answer 2a, ...]. The attention is tree-shaped: each segment attends
its ancestors' segments fully plus itself causally (one SDPA call per segment with the ancestors' keys/values
prepended and a boolean mask). Why packing rather than expanding a prefix's KV cache over the members: the
members have different lengths, so a KV-cache batch is padded again (what packing exists to avoid on CPU), and
the tree fits in the same packed row as the pass's other inputs, so one forward pass serves them all, at every
level of sharing. An input equal to a shared prefix reads that prefix's last token; identical inputs are
computed once.
Encoder heads attend both ways (a prefix token's state depends on what follows), so they are never grouped.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from service.grouping import TreeLayout
from rewardmodel.modeling import captured_layers, has_decoder_head, score_rows

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
    prefix_tree: list[tuple[int, int, tuple[tuple[int, int], ...], torch.Tensor | None]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    if prefix_tree is not None:
        _check_unsupported(kwargs, max(e - s + sum(ce - cs for cs, ce in c) for s, e, c, _ in prefix_tree))
        return _tree_attention(module, query, key, value, dropout, scaling, is_causal, prefix_tree)
    if cu_seq_lens_q is None:
        raise RuntimeError("packed attention needs cu_seq_lens_q (segment boundaries)")
    causal = bool(getattr(module, "is_causal", False)) if is_causal is None else bool(is_causal)
    gqa = query.shape[1] != key.shape[1]  # grouped-query attention: SDPA shares the key/value heads itself
    bounds = cu_seq_lens_q.tolist()
    _check_unsupported(kwargs, max(e - s for s, e in zip(bounds[:-1], bounds[1:])))
    outs = [
        F.scaled_dot_product_attention(
            query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=causal,
            enable_gqa=gqa,
        )
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    out = torch.cat(outs, dim=2)  # (1, H, T, D)
    return out.transpose(1, 2).contiguous(), None  # (1, T, H, D)


def _tree_attention(
    module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, dropout: float,
    scaling: float | None, is_causal: bool | None,
    tree: list[tuple[int, int, tuple[tuple[int, int], ...], torch.Tensor | None]],
) -> tuple[torch.Tensor, None]:
    """Segments (start, end, context ranges, mask) in row order; a segment with a context (its ancestors in the
    prefix tree) attends the context fully and itself causally, through `mask` (n, ctx + n)."""
    if is_causal is False or not getattr(module, "is_causal", True):
        raise RuntimeError("prefix groups need causal attention")
    gqa = query.shape[1] != key.shape[1]  # the context's keys/values are copied at their own (fewer) heads
    outs = []
    for s, e, context, mask in tree:
        q = query[:, :, s:e]
        if mask is None:
            outs.append(F.scaled_dot_product_attention(
                q, key[:, :, s:e], value[:, :, s:e], dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa))
            continue
        k = torch.cat([key[:, :, cs:ce] for cs, ce in context] + [key[:, :, s:e]], dim=2)  # (1, H, P + n, D)
        v = torch.cat([value[:, :, cs:ce] for cs, ce in context] + [value[:, :, s:e]], dim=2)
        outs.append(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scaling,
                                                   enable_gqa=gqa))
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


def unpackable(config: Any, max_length: int) -> str | None:
    """Why this model's attention is more than our packed attention computes (a reason), or None. Its inputs then
    run transformers' own padded forward, which applies it."""
    window = getattr(config, "sliding_window", None)
    sliding = getattr(config, "use_sliding_window", True) is not False and (
        "sliding_attention" in (getattr(config, "layer_types", None) or ["sliding_attention"]))
    if isinstance(window, int) and sliding and window < max_length:
        return f"a sliding attention window ({window} tokens) shorter than its inputs may be ({max_length})"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return "attention logit soft-capping"
    return None


def _check_unsupported(kwargs: dict[str, Any], longest: int) -> None:
    """A safety net under `unpackable`: attention arguments that would change the numbers are never dropped."""
    window = kwargs.get("sliding_window")
    if window is not None and longest > window:
        raise RuntimeError(f"packed attention has no sliding window ({window} tokens, a sequence of {longest})")
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise RuntimeError(f"packed attention does not apply {name}")


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


def _context_mask(n: int, ctx: int, device: Any) -> torch.Tensor:
    """(n, ctx + n) boolean: every query sees the whole context, and itself causally."""
    mask = torch.ones(n, ctx + n, dtype=torch.bool, device=device)
    mask[:, ctx:] = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return mask


def tree_reward_forward(model: Any, layout: TreeLayout) -> torch.Tensor:
    """Head outputs (N, heads) float32 of a decoder RM over a radix-tree layout (service.grouping.prefix_tree_layout):
    every shared segment computed once, each segment attending its ancestors' segments and itself causally."""
    device = next(model.parameters()).device
    tree = []
    for seg in layout.segments:
        ctx = sum(e - s for s, e in seg.context)
        mask = _context_mask(seg.end - seg.start, ctx, device) if ctx else None
        tree.append((seg.start, seg.end, seg.context, mask))
    base = getattr(model, model.base_model_prefix)
    with captured_layers(model) as seen:
        hidden = base(
            input_ids=torch.tensor([layout.ids], dtype=torch.long, device=device),  # (1, T)
            position_ids=torch.tensor([layout.positions], dtype=torch.long, device=device),  # (1, T)
            prefix_tree=tree, use_cache=False,
        ).last_hidden_state  # (1, T, H)
    read = torch.tensor(layout.read, device=device)
    return score_rows(model, hidden, seen, lambda h: h[0][read])


def packed_reward_forward(model: Any, kind: str, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rewards (N,) of the first head; see packed_head_outputs."""
    return packed_head_outputs(model, kind, batch)[:, 0]


def packed_head_outputs(model: Any, kind: str, batch: Sequence[Sequence[int]]) -> torch.Tensor:
    """Head outputs (N, heads) float32 for N unpadded sequences in one packed forward pass. A `PlannedBatch` with prefix
    prefixes worth sharing goes through `tree_reward_forward` (decoder heads)."""
    layout = batch.layout if kind == "decoder" and getattr(batch, "min_shared", 0) > 0 else None
    if layout is not None and layout.saved > 0:
        return tree_reward_forward(model, layout)
    device = next(model.parameters()).device
    input_ids, positions, cu = pack(batch, device)
    longest = int((cu[1:] - cu[:-1]).max())
    extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    base = getattr(model, model.base_model_prefix)
    if kind == "decoder":
        with captured_layers(model) as seen:
            hidden = base(input_ids=input_ids, position_ids=positions, **extra).last_hidden_state  # (1, T, H)
        last = cu[1:].long() - 1  # last token of each segment
        return score_rows(model, hidden, seen, lambda h: h[0][last])
    token_types = torch.zeros_like(input_ids)
    hidden = base.encoder(
        base.embeddings(input_ids=input_ids, position_ids=positions, token_type_ids=token_types),
        attention_mask=None, position_ids=positions, **extra,
    ).last_hidden_state[0]  # (T, H)
    first = hidden[cu[:-1].long()].unsqueeze(1)  # (N, 1, H): the [CLS] of each segment
    return model.classifier(model.dropout(base.pooler(first))).float()
