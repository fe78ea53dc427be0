"""Batch-invariant forwards of the two reward-model families we serve natively, built from the weights of a
loaded transformers model with the rules of service/backends/invariant.py:

- `DecoderForward`: Llama-family decoders (llama, mistral, qwen2: RMSNorm, rotary positions, grouped-query
  attention, gated MLP, a score head read at the last token of each input, or at each step end for PRMs);
- `EncoderForward`: BERT-style encoders (embeddings + LayerNorm, bidirectional attention, GELU MLP, pooler on the
  first token, a classifier).

Precision (`compute`): fp32, or mixed bf16: the matmul weights and inputs in bf16 (fp32 accumulation inside the
kernels), while the residual stream, norms, rotary positions, attention softmax, activations and the reward head
stay fp32 (the head reads the fp32 final hidden state, so the reward itself is never rounded to bf16). With
`gemm="int8x3"` or `"int8x5"` every matmul is three or five exact int8 products over split operands
(`Int8Linear`) and all else is fp32.
`build_forward` returns None for a model it does not know (the backend then uses its packed or padded path).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from service.backends.invariant import (
    ACTIVATIONS, TILE, Int8Linear, RowLinear, TileLayout, attention, layer_norm, read_head, rms_norm, rotate,
    tile_layout,
)
from service.backends.precision import INT8_PRODUCTS
from rewardmodel.modeling import earlier_layers

log = logging.getLogger("rewardserve.invariant")

DECODERS = {"llama", "mistral", "qwen2"}
STATIC_ROPE = {None, "default", "linear", "llama3", "yarn"}


def _rope_type(config: Any) -> str | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    return params.get("rope_type") or params.get("type") if isinstance(params, dict) else None


GEMMS = ("native", *INT8_PRODUCTS)


def build_forward(model: Any, compute: torch.dtype, max_length: int, gemm: str = "native",
                  compile: str | bool = False) -> "DecoderForward | EncoderForward | None":
    """compile: fuse a decoder's element-wise work with torch.compile (service/backends/fused.py; encoders run
    unfused): True / "auto" (fall back to unfused, logged, if compiling fails) or "on" (a failure raises)."""
    if gemm not in GEMMS:
        raise ValueError(f"unknown GEMM kind {gemm!r}: one of {', '.join(GEMMS)}")
    config = model.config
    kind = config.model_type
    if kind in DECODERS and hasattr(model, "score"):
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_length:
            log.info("invariant forward: %s uses a sliding window shorter than max_length; not used", kind)
            return None
        if _rope_type(config) not in STATIC_ROPE:
            log.info("invariant forward: rope type %r is not static; not used", _rope_type(config))
            return None
        if getattr(config, "hidden_act", "silu") not in ACTIVATIONS:
            return None
        return DecoderForward(model, compute, max_length, gemm, compile=compile)
    if kind == "bert" and hasattr(model, "classifier"):
        if getattr(config, "hidden_act", "gelu") not in ACTIVATIONS:
            return None
        if compile:
            log.warning("invariant forward: encoders run unfused (--compile fuses decoders); /v1/models says "
                        "compiled: false")
        return EncoderForward(model, compute, gemm)
    return None


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().contiguous()


Linear = RowLinear | Int8Linear


def _linear(module: Any, compute: torch.dtype, gemm: str) -> Linear:
    if gemm in INT8_PRODUCTS:
        return Int8Linear(module.weight, module.bias, INT8_PRODUCTS[gemm])
    return RowLinear(module.weight, module.bias, compute)


@dataclass
class _DecoderLayer:
    ln1: torch.Tensor
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ln2: torch.Tensor
    gate: Linear
    up: Linear
    down: Linear


class DecoderForward:
    causal = True

    def __init__(self, model: Any, compute: torch.dtype, max_length: int, gemm: str = "native",
                 compile: str | bool = False):
        config, base = model.config, model.model
        self.compute = compute
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.act = ACTIVATIONS[getattr(config, "hidden_act", "silu")]
        self.embed = _fp32(base.embed_tokens.weight)
        self.layers = []
        for layer in base.layers:
            attn, mlp = layer.self_attn, layer.mlp

            def lin(m: Any) -> Linear:
                return _linear(m, compute, gemm)

            self.layers.append(_DecoderLayer(
                _fp32(layer.input_layernorm.weight), lin(attn.q_proj), lin(attn.k_proj), lin(attn.v_proj),
                lin(attn.o_proj), _fp32(layer.post_attention_layernorm.weight), lin(mlp.gate_proj), lin(mlp.up_proj),
                lin(mlp.down_proj),
            ))
        self.norm = _fp32(base.norm.weight)
        self.head_weight = _fp32(model.score.weight)
        self.head_bias = None if getattr(model.score, "bias", None) is None else _fp32(model.score.bias)
        # heads that read an earlier layer (rewardmodel.modeling.head_layers): {layers read: their score rows}
        self.taps = {k: torch.tensor(rows, device=self.embed.device) for k, rows in earlier_layers(model).items()}
        rotary = base.rotary_emb
        inv_freq = rotary.inv_freq.detach().float().cpu()
        positions = torch.arange(max(max_length, TILE) + TILE, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        device = self.embed.device  # the table lives where the weights do (CUDA too)
        self.cos, self.sin = (emb.cos() * scaling).to(device), (emb.sin() * scaling).to(device)  # no per-pass exp/sin
        self.widths = (config.hidden_size, config.intermediate_size, self.heads * self.head_dim,
                       self.kv_heads * self.head_dim, self.head_dim)
        self.ops = None
        self.compile_error: str | None = None
        if compile:
            self._compile(strict=compile == "on")

    @property
    def compiled(self) -> bool:
        return self.ops is not None

    def _compile(self, strict: bool) -> None:
        """Fuse the element-wise work (service/backends/fused.py) and compile it now, on two pass sizes (one
        kernel for every row count), so no request waits for the compiler. A failure runs this forward unfused
        (logged; `compile_error` says why), or raises when compiling was asked for outright (`strict`)."""
        from service.backends.fused import FusedDecoderOps
        from service.grouping import PlannedBatch, prefix_tree_layout

        self.ops = FusedDecoderOps(self.act)
        try:
            with torch.inference_mode():
                for length in (5, 40):  # passes of one row tile and of three: the kernels serve both
                    tree = prefix_tree_layout(PlannedBatch([[0] * length]), 0)
                    self._fused(self.layout(tree, 0).to(self.embed.device))
        except Exception as exc:  # noqa: BLE001 - any compiler failure: report it, run unfused
            self.ops = None
            if strict:
                raise RuntimeError(f"--compile on: compiling the fused forward failed: {exc}") from exc
            self.compile_error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("compiling the fused forward failed (%s); running it unfused", self.compile_error)

    def layout(self, tree: Any, pad_id: int, reads: Sequence[Sequence[int]] | None = None) -> TileLayout:
        return tile_layout(tree, pad_id, causal=True, widths=self.widths, reads=reads)

    def __call__(self, tl: TileLayout) -> torch.Tensor:
        """Rewards (or logits) at every read row, fp32: (reads, labels)."""
        if self.ops is not None:
            return self._fused(tl)
        rows = tl.rows
        flat, taps = [r for rs in tl.read for r in rs], {}
        picked = self._picked(flat)
        h = self.embed.index_select(0, tl.ids)  # (R, H) fp32 residual stream
        cos = self.cos.index_select(0, tl.positions)[:, None, :]  # (R, 1, D)
        sin = self.sin.index_select(0, tl.positions)[:, None, :]
        for i, layer in enumerate(self.layers):
            x = rms_norm(h, layer.ln1, self.eps).to(self.compute)  # rounded once for the three GEMMs that read it
            q = rotate(layer.q(x).float().view(rows, self.heads, self.head_dim), cos, sin)
            k = rotate(layer.k(x).float().view(rows, self.kv_heads, self.head_dim), cos, sin)
            v = layer.v(x).float().view(rows, self.kv_heads, self.head_dim)
            a = attention(q, k, v, tl.work, self.scale)  # (R, Hq, D)
            h += layer.o(a.reshape(rows, self.heads * self.head_dim))  # in place; a bf16 term is added in fp32
            x = rms_norm(h, layer.ln2, self.eps).to(self.compute)
            gated = self.act(layer.gate(x).float())
            gated *= layer.up(x)  # act(gate) * up in fp32, in place
            h += layer.down(gated)
            self._tap(taps, i + 1, h, picked)
        h = rms_norm(h, self.norm, self.eps)
        return self._read(h, flat, taps)

    def _picked(self, flat: list[int]) -> torch.Tensor | None:
        """The read rows as an index, built once per pass where heads read earlier layers (else None)."""
        return torch.as_tensor(flat, dtype=torch.long, device=self.embed.device) if self.taps else None

    def _tap(self, taps: dict[int, torch.Tensor], done: int, h: torch.Tensor, picked: torch.Tensor | None) -> None:
        """Keep the read rows of the residual stream after `done` layers where a head reads that layer."""
        if done in self.taps:
            taps[done] = h.index_select(0, picked)  # a copy: h changes in place

    def _read(self, final: torch.Tensor, flat: list[int], taps: dict[int, torch.Tensor]) -> torch.Tensor:
        """The head on the final (normed) hidden state; each head that reads an earlier layer on the final norm of
        that layer's kept rows. Every head's column is computed on its own (read_head), so the bits of a head do
        not depend on the other heads or on which layers they read."""
        out = read_head(final, flat, self.head_weight, self.head_bias)
        for k, rows in self.taps.items():
            normed = rms_norm(taps[k], self.norm, self.eps)
            bias = None if self.head_bias is None else self.head_bias[rows]
            out[:, rows] = read_head(normed, range(len(flat)), self.head_weight[rows], bias)
        return out

    def _fused(self, tl: TileLayout) -> torch.Tensor:
        """The same layers with the element-wise work between GEMMs fused (service/backends/fused.py)."""
        ops, rows, eps, compute = self.ops, tl.rows, self.eps, self.compute
        flat, taps = [r for rs in tl.read for r in rs], {}
        picked = self._picked(flat)
        h = self.embed.index_select(0, tl.ids)  # (R, H) fp32 residual stream
        cos = self.cos.index_select(0, tl.positions)[:, None, :]  # (R, 1, D)
        sin = self.sin.index_select(0, tl.positions)[:, None, :]
        x = ops.norm(h, self.layers[0].ln1, eps, compute)
        for i, layer in enumerate(self.layers):
            q, k, v = ops.rotary(layer.q(x), layer.k(x), layer.v(x), cos, sin, self.heads, self.kv_heads,
                                 self.head_dim)
            a = attention(q, k, v, tl.work, self.scale)  # (R, Hq, D)
            h, x = ops.add_norm(h, layer.o(a.reshape(rows, self.heads * self.head_dim)), layer.ln2, eps, compute)
            gated = ops.gated(layer.gate(x), layer.up(x), compute)
            last = i + 1 == len(self.layers)
            h, x = ops.add_norm(h, layer.down(gated), self.norm if last else self.layers[i + 1].ln1, eps,
                                torch.float32 if last else compute)
            self._tap(taps, i + 1, h, picked)
        return self._read(x, flat, taps)


@dataclass
class _EncoderLayer:
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    ln1: tuple[torch.Tensor, torch.Tensor]
    inter: Linear
    out: Linear
    ln2: tuple[torch.Tensor, torch.Tensor]


class EncoderForward:
    causal = False

    def __init__(self, model: Any, compute: torch.dtype, gemm: str = "native"):
        config, base = model.config, model.bert
        self.compute = compute
        self.heads = config.num_attention_heads
        self.head_dim = config.hidden_size // self.heads
        self.scale = self.head_dim ** -0.5
        self.eps = config.layer_norm_eps
        self.act = ACTIVATIONS[config.hidden_act]
        emb = base.embeddings
        self.word = _fp32(emb.word_embeddings.weight)
        self.position = _fp32(emb.position_embeddings.weight)
        self.token_type = _fp32(emb.token_type_embeddings.weight[0])
        self.emb_ln = (_fp32(emb.LayerNorm.weight), _fp32(emb.LayerNorm.bias))
        self.layers = []
        for layer in base.encoder.layer:
            att = layer.attention

            def lin(m: Any) -> Linear:
                return _linear(m, compute, gemm)

            self.layers.append(_EncoderLayer(
                lin(att.self.query), lin(att.self.key), lin(att.self.value), lin(att.output.dense),
                (_fp32(att.output.LayerNorm.weight), _fp32(att.output.LayerNorm.bias)),
                lin(layer.intermediate.dense), lin(layer.output.dense),
                (_fp32(layer.output.LayerNorm.weight), _fp32(layer.output.LayerNorm.bias)),
            ))
        pooler = getattr(base, "pooler", None)  # none: a token-classification head (a PRM reads step ends)
        self.pooler = None if pooler is None else (_fp32(pooler.dense.weight), _fp32(pooler.dense.bias))
        self.head_weight = _fp32(model.classifier.weight)
        self.head_bias = _fp32(model.classifier.bias)
        self.widths = (config.hidden_size, config.intermediate_size, self.head_dim)

    def layout(self, tree: Any, pad_id: int, reads: Sequence[Sequence[int]] | None = None) -> TileLayout:
        first = [[seg.start] for seg in tree.segments]  # [CLS]: encoders are never grouped, one segment each
        return tile_layout(tree, pad_id, causal=False, widths=self.widths, reads=reads if reads is not None else first)

    def __call__(self, tl: TileLayout) -> torch.Tensor:
        rows = tl.rows
        h = self.word.index_select(0, tl.ids) + self.position.index_select(0, tl.positions) + self.token_type
        h = layer_norm(h, *self.emb_ln, self.eps)
        for layer in self.layers:
            x = h.to(self.compute)  # rounded once for the three GEMMs that read it
            q = layer.q(x).float().view(rows, self.heads, self.head_dim)
            k = layer.k(x).float().view(rows, self.heads, self.head_dim)
            v = layer.v(x).float().view(rows, self.heads, self.head_dim)
            a = attention(q, k, v, tl.work, self.scale).reshape(rows, self.heads * self.head_dim)
            h = layer_norm(h + layer.o(a).float(), *layer.ln1, self.eps)
            h = layer_norm(h + layer.out(self.act(layer.inter(h).float())).float(), *layer.ln2, self.eps)
        flat = [r for rs in tl.read for r in rs]
        if self.pooler is None:
            return read_head(h, flat, self.head_weight, self.head_bias)
        pooled = read_head(h, flat, *self.pooler, activation=torch.tanh, keep_padded=True, per_column=False)
        return read_head(pooled, range(len(flat)), self.head_weight, self.head_bias)
