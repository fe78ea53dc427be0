"""Batch-invariant building blocks: an input's reward is bit-identical whatever shares its forward pass
(alone, packed with others, in a shared-prefix tree or not), in fp32 and in bf16.

Why results drift with the batch, and what each rule here removes:

1. A GEMM kernel is chosen by the shape of the whole call (a row alone takes a gemv path; some kernels block
   differently past a size), so a row's result can depend on how many rows share the call. Rule: every token
   lives in a TILE of `TILE` rows that holds one segment's absolute positions [kT, (k+1)T); GEMMs run over whole
   tiles only, in calls of up to CALL_TILES tiles when `RowLinear`'s probe shows that every such call gives each
   row the bits of its tile computed alone, else tile by tile (one fixed shape). The reward head is a GEMM over fixed-size tiles of read rows too.
2. Elementwise kernels run a vector loop and finish each thread's chunk with a scalar (or masked) tail, and
   transcendental functions (exp, silu, rsqrt, erf) may round differently there: a value's bits would depend on
   where its chunk ends, i.e. on the total size. Rule: `tile_layout` pads a pass's rows so that each thread's
   chunk of every row-stacked tensor is a whole number of vector blocks (no tail), for this process's thread
   count; a step over one value per row (RMSNorm's rsqrt) runs on a copy padded by `aligned_count`.
3. Attention kernels block queries and keys by sequence length, so the prefix of a shared-prefix group computed
   alone differs from the same rows computed inside the whole input. Rule: queries are attended in tiles of
   `TILE` absolute positions, each against a key buffer whose length depends only on the tile's position (an
   encoder's whole sequence is one item, its shape a function of its own length), keys placed by absolute
   position and masked where unseen: every query row meets the same SDPA call shape, hence the same kernel and
   the same numbers, shared prefix or not.
4. Reductions over a row (norms) see a row of fixed length in a call of fixed-size tiles.

What this gives is checked, not assumed: the backend's start-up self-check scores probe inputs alone, packed and
in a prefix tree and compares bits, and tests/unit/test_invariance.py draws random compositions (hypothesis).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from service.backends.precision import INT8_PRODUCTS

TILE = 64
"""Queries per attention tile and keys per attention block (aligned at absolute position 0), rows per head tile."""
ROW_TILE = 16
"""A pass's rows are padded to a multiple of this (GEMM calls see whole tiles; see RowLinear)."""
VECTOR_BLOCK = 64
"""Elements one vector-loop step covers at most (2 x 32 bf16 lanes on AVX-512); chunks are aligned to it."""
GRAIN = 32768
"""ATen's elementwise grain size (at::internal::GRAIN_SIZE): below it one thread does all."""


def thread_chunks_aligned(numel: int, threads: int) -> bool:
    """Whether ATen's parallel_for over `numel` elements gives every thread a whole number of vector blocks
    (ParallelOpenMP: one chunk below the grain, else ceil(numel / min(threads, ceil(numel / grain))))."""
    if numel % VECTOR_BLOCK:
        return False
    if numel < GRAIN or threads <= 1:
        return True
    workers = min(threads, -(-numel // GRAIN))
    return (-(-numel // workers)) % VECTOR_BLOCK == 0


def aligned_count(count: int, per_item: int | Sequence[int], threads: int | None = None, step: int = 1) -> int:
    """The smallest count' >= count (a multiple of `step`) whose `count' x per_item` elements split into aligned
    thread chunks, for every `per_item` given."""
    threads = threads or torch.get_num_threads()
    sizes = [per_item] if isinstance(per_item, int) else list(per_item)
    n = max(step, -(-count // step) * step)
    for _ in range(4096):
        if all(thread_chunks_aligned(n * size, threads) for size in sizes):
            return n
        n += step
    raise RuntimeError(f"no aligned size near {count} x {sizes} for {threads} threads")


# ---- the layout of one pass ----------------------------------------------------------------------------------
@dataclass
class AttentionGroup:
    """The attention items of one pass with one shape (Q queries, L keys: one SDPA call), with every index and
    mask the attention needs precomputed once per pass (the same for every layer, and no device syncs)."""

    q_index: torch.Tensor  # (n*Q,) the row of each query slot (empty slots read a padding row; results dropped)
    kv_index: torch.Tensor  # (n*L,) the row of each key slot, in absolute position order (empty: a padding row)
    mask: torch.Tensor  # (n, 1, Q, L) bool (an encoder's: (n, 1, 1, L)): the key slot holds a key this query sees
    dest: torch.Tensor  # (m,) the rows the real query slots write
    src: torch.Tensor  # (m,) which of the n*Q query slots each comes from
    tiles: int  # n: work items (batch entries of the SDPA call)
    length: int  # L
    queries: int = TILE  # Q: query slots per item (a decoder's tile; an encoder's whole padded sequence)

    def to(self, device: Any) -> "AttentionGroup":
        return AttentionGroup(self.q_index.to(device), self.kv_index.to(device), self.mask.to(device),
                              self.dest.to(device), self.src.to(device), self.tiles, self.length, self.queries)


@dataclass
class Work:
    """Attention work: one item per query tile of one segment, gathered into groups by key length."""

    groups: list[AttentionGroup]

    def to(self, device: Any) -> "Work":
        return Work([g.to(device) for g in self.groups])


@dataclass
class TileLayout:
    """A pass in tile space: `rows` slots (tiles x TILE, padded for aligned chunks), the token and position of each
    slot, which slots hold real tokens, where each input's reward is read, and the attention work."""

    ids: torch.Tensor  # (R,)
    positions: torch.Tensor  # (R,)
    valid: torch.Tensor  # (R,) bool
    read: list[list[int]]  # per input: the rows its rewards are read at (last token; or every step end)
    work: Work

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: Any) -> "TileLayout":
        if str(device) == "cpu":
            return self
        return TileLayout(self.ids.to(device), self.positions.to(device), self.valid.to(device), self.read,
                          self.work.to(device))


def tile_layout(layout: Any, pad_id: int, causal: bool, widths: Sequence[int], reads: Sequence[Sequence[int]] | None
                = None) -> TileLayout:
    """A service.grouping.TreeLayout (rows in order, positions, segments with their ancestors, read rows) as the
    rows of one pass: the layout's rows packed as they are, then padding rows up to a whole number of ROW_TILEs and
    aligned thread chunks for every row width used (rule 2). No row's result depends on where it sits (rule 1), so
    rows need no other place; attention finds a segment's keys by position (rule 3). `reads` (per input, rows of
    `layout`) overrides the one read row per input (PRM step ends)."""
    n = len(layout.ids)
    widths = [w for w in widths if w]
    tiles = -(-(n + 1) // ROW_TILE)  # at least one padding row: row n, what empty key slots read (see _work)
    while not all(thread_chunks_aligned(tiles * ROW_TILE * w, torch.get_num_threads()) for w in widths):
        tiles += 1
    rows = tiles * ROW_TILE
    ids = torch.full((rows,), pad_id, dtype=torch.long)
    positions = torch.zeros(rows, dtype=torch.long)
    valid = torch.zeros(rows, dtype=torch.bool)
    ids[:n] = torch.from_numpy(np.asarray(layout.ids, dtype=np.int64))
    positions[:n] = torch.from_numpy(np.asarray(layout.positions, dtype=np.int64))
    valid[:n] = True
    read = [list(rs) for rs in (reads if reads is not None else [[r] for r in layout.read])]
    return TileLayout(ids, positions, valid, read, _work(layout, causal, pad_row=n))


def _work(layout: Any, causal: bool, pad_row: int = 0) -> Work:
    """The attention items of a pass, every index built with whole-array operations (the pass's Python cost must
    stay small beside a GPU forward): one item per query tile of a decoder's segment (grouped by the tile's
    index a: queries [aT, (a+1)T) against the key slots of absolute positions [0, (a+1)T)), one per encoder
    sequence (grouped by its padded length). Empty slots read `pad_row`, a padding row: a masked slot's weight is
    exactly zero, but zero times a NaN value is NaN, so an input whose values went NaN (a broken embedding row,
    an overflow) must not be what another input's empty slots read."""
    segments = layout.segments
    # Each segment's path: the row of every absolute position 0 .. end-1 (its ancestors' rows, then its own).
    paths, depths = [], []
    for seg in segments:
        ranges = [np.arange(s, e) for s, e in seg.context] + [np.arange(seg.start, seg.end)]
        paths.append(np.concatenate(ranges))
        depths.append(len(paths[-1]) - (seg.end - seg.start))
    by_shape: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (Q, L) -> (segment, first query position)
    for i, (path, depth) in enumerate(zip(paths, depths)):
        if not causal:  # an encoder's queries all see the same keys: one item holds the whole sequence
            length = -(-len(path) // ROW_TILE) * ROW_TILE  # a function of its own length only
            by_shape.setdefault((length, length), []).append((i, 0))
            continue
        for a in range(depth // TILE, (len(path) - 1) // TILE + 1):  # the tiles its own positions touch
            by_shape.setdefault((TILE, (a + 1) * TILE), []).append((i, a * TILE))
    groups = []
    for (queries, length), items in sorted(by_shape.items()):
        n = len(items)
        kr = np.full((n, length), -1, dtype=np.int64)  # the row holding each key slot's position, or -1
        qr = np.full((n, queries), -1, dtype=np.int64)  # the row of each query slot's position, or -1
        for j, (i, t0) in enumerate(items):
            path, depth = paths[i], depths[i]
            seen = min(length, len(path))
            kr[j, :seen] = path[:seen]
            own_lo, own_hi = max(depth, t0), min(len(path), t0 + queries)
            qr[j, own_lo - t0:own_hi - t0] = path[own_lo:own_hi]
        has_key = kr >= 0
        if causal:  # key slot p holds position p; query slot s is position t0 + s; a decoder sees p <= itself
            t0s = np.array([t0 for _, t0 in items], dtype=np.int64)
            qpos = t0s[:, None] + np.arange(queries)  # (n, Q)
            mask = has_key[:, None, :] & (np.arange(length)[None, None, :] <= qpos[:, :, None])  # (n, Q, L)
        else:
            mask = has_key[:, None, :]  # (n, 1, L)
        flat = qr.reshape(-1)
        src = np.flatnonzero(flat >= 0)
        index = [np.where(flat >= 0, flat, pad_row), np.where(kr >= 0, kr, pad_row).reshape(-1),
                 np.ascontiguousarray(mask[:, None]), flat[src], src]
        groups.append(AttentionGroup(*map(torch.from_numpy, index), n, length, queries))
    return Work(groups)


# ---- GEMMs over tiles ---------------------------------------------------------------------------------------
CALL_TILES = 64
"""Most row tiles in one GEMM call: the probe checks every call size up to this, no bigger call is ever made (on
an AMX Xeon, a bf16 call over ~2,300 rows gave rows other bits than the same rows in 16-row calls, while calls
of up to 1,024 rows did not)."""


class RowLinear:
    """A linear layer computed over whole tiles: calls of up to CALL_TILES tiles when this machine's kernel gives
    every row the same bits as a call over its tile alone (probed once per weight shape and dtype), else one call
    per tile."""

    _one_call: dict[tuple, bool] = {}

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        self.weight = weight.detach().to(dtype).contiguous()
        self.bias = None if bias is None else bias.detach().to(dtype).contiguous()
        self.dtype = dtype
        key = (tuple(self.weight.shape), dtype, self.weight.device.type, torch.get_num_threads())
        if key not in RowLinear._one_call:
            RowLinear._one_call[key] = _probe_one_call(self.weight, self.bias)
        self.one_call = RowLinear._one_call[key]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (R, K) with R a multiple of ROW_TILE -> (R, N)
        x = x.to(self.dtype)
        if self.one_call and x.shape[0] <= CALL_TILES * ROW_TILE:
            return F.linear(x, self.weight, self.bias)
        return linear_calls(x, self.weight, self.bias, CALL_TILES * ROW_TILE if self.one_call else ROW_TILE)


def linear_calls(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, size: int) -> torch.Tensor:
    """F.linear over calls of `size` rows, each writing its rows of one output in place (no concatenation): mm /
    addmm, the kernels F.linear calls (the probe checks this path's bits too)."""
    out = x.new_empty((x.shape[0], weight.shape[0]))
    w = weight.t()
    for t, o in zip(x.split(size), out.split(size)):
        if bias is None:
            torch.mm(t, w, out=o)
        else:
            torch.addmm(bias, t, w, out=o)
    return out


# ---- int8x3 / int8x5: near-fp32 GEMMs from exact integer products ---------------------------------------------
LO = 254.0
"""Each slice's weight below the one before: a value's remainder after a slice (at most half a step) times this is
at most 127, so every slice fills int8's symmetric range."""


def split_int8(x: torch.Tensor, slices: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of x (R, K) as int8 slices with one fp32 scale per row: x ~= scale * (s0 + s1 / LO + s2 / LO^2 ...),
    two slices leaving at most max|row| / 64,516 per element (about 16 bits of the row's largest value, where bf16
    keeps 8 bits of each element), three about 24 bits. Returns ([s0 | s1 | ...] as (R, slices*K) int8, scale
    (R, 1)). Every step is an exactly rounded element-wise operation (abs-max, divide, round half to even,
    subtract, multiply), so a row's slices depend on that row alone, in a vector loop or its tail; an all-zero row
    (attention's empty rows) gets scale 1."""
    peak = x.abs().amax(dim=1, keepdim=True)
    scale = torch.where(peak > 0, peak / 127.0, torch.ones_like(peak))
    y = x / scale
    k = x.shape[1]
    out = torch.empty((x.shape[0], slices * k), dtype=torch.int8, device=x.device)
    for i in range(slices):
        part = torch.round(y)
        out[:, i * k:(i + 1) * k] = part
        if i + 1 < slices:
            y -= part
            y *= LO
    return out, scale


class Int8Linear:
    """A linear layer from int8 GEMMs with exact int32 sums, scaled back in fp32. Weights are split into two int8
    slices (w0, w1) per output row, inputs into two (x0, x1) or three (x0, x1, x2) per row; with u = 1/LO:

        int8x3:  x W^T ~= sx sw (x0.w0 + u (x0.w1 + x1.w0))                       3 products, 2 GEMM calls
        int8x5:  x W^T ~= sx sw (x0.w0 + u (x0.w1 + x1.w0) + u^2 (x1.w1 + x2.w0))  5 products, 3 GEMM calls

    (the terms of one order share a call: [x0|x1].[w1|w0] and [x1|x2].[w1|w0], one weight matrix for both). Integer
    sums are exact in any order, so a row's result never depends on the call's size or kernel: no tiles, no probe.
    int8x3 drops the u^2 terms, as large as what two input slices leave; int8x5 keeps them and is left with the
    weights' two-slice rounding (bench/precision.py measures both on a model). Needs the machine's int8 GEMM to be
    exact (`int8_gemm_exact`: oneDNN on CPUs without VNNI can saturate 16-bit pair sums)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, products: int = 3):
        if products not in INT8_PRODUCTS.values():
            allowed = " or ".join(map(str, sorted(INT8_PRODUCTS.values())))
            raise ValueError(f"products must be {allowed}, not {products}")
        w = weight.detach().float()
        n, k = w.shape
        if w.is_cuda and (k % 8 or n % 8):
            raise ValueError(f"int8 GEMMs on CUDA need sizes that are multiples of 8 (got {n} x {k})")
        slices, scale = split_int8(w)
        self.products = products
        self.w0 = slices[:, :k].t()  # (K, N): column-major, the layout the int8 GEMM takes
        self.cross = torch.cat([slices[:, k:], slices[:, :k]], dim=1).t()  # (2K, N): [w1 | w0]
        self.scale = scale.reshape(1, n)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (R, K) -> (R, N) fp32
        rows = x.shape[0]
        minimum = 32 if x.is_cuda else 0  # cuBLAS's int8 GEMM takes more than 16 rows
        if rows < minimum:
            x = F.pad(x, (0, 0, 0, minimum - rows))
        k = x.shape[1]
        xs, scale = split_int8(x.float(), 3 if self.products == 5 else 2)
        first = torch._int_mm(xs[:, :2 * k], self.cross)  # x0.w1 + x1.w0
        if self.products == 5:
            out = torch.div(torch._int_mm(xs[:, k:3 * k], self.cross), LO)  # fp32: (x1.w1 + x2.w0) u
            out += first
            out /= LO
        else:
            out = torch.div(first, LO)  # fp32
        out += torch._int_mm(xs[:, :k], self.w0)
        out *= scale
        out *= self.scale
        if self.bias is not None:
            out += self.bias
        return out[:rows] if rows < minimum else out


_INT8_EXACT: dict[str, bool] = {}


def int8_gemm_exact(device: str = "cpu") -> bool:
    """Whether torch._int_mm on this device gives exact int32 sums, saturated inputs included (every pair of
    127 x 127 products is where a 16-bit intermediate would clip), checked against float64 sums (exact here)."""
    if device not in _INT8_EXACT:
        gen = torch.Generator(device="cpu").manual_seed(0)
        a = torch.randint(-127, 128, (64, 512), generator=gen, dtype=torch.int8)
        b = torch.randint(-127, 128, (512, 64), generator=gen, dtype=torch.int8)
        a[:8] = 127
        a[8:16] = -127
        b[:, :8] = 127
        b[:, 8:16] = -127
        try:
            got = torch._int_mm(a.to(device), b.t().contiguous().t().to(device)).cpu().double()
            _INT8_EXACT[device] = bool(torch.equal(got, a.double() @ b.double()))
        except (RuntimeError, NotImplementedError):  # no int8 GEMM here
            _INT8_EXACT[device] = False
    return _INT8_EXACT[device]


def _probe_one_call(weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a call over any number of tiles (up to CALL_TILES) gives every row, wherever it sits, the bits of a
    call over its tile alone."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(ROW_TILE * CALL_TILES, weight.shape[1], generator=gen).to(weight.device, weight.dtype)
    per_tile = torch.cat([F.linear(t, weight, bias) for t in x.split(ROW_TILE)])
    if not torch.equal(linear_calls(x, weight, bias, ROW_TILE * 33), per_tile):  # the in-place calls (33 + 31)
        return False
    for tiles in (2, 3, 5, 8, 17, 33, CALL_TILES - 1, CALL_TILES):
        if not torch.equal(F.linear(x[:ROW_TILE * tiles], weight, bias), per_tile[:ROW_TILE * tiles]):
            return False
    return True


def read_head(hidden: torch.Tensor, rows: Sequence[int], weight: torch.Tensor, bias: torch.Tensor | None,
              activation: Callable[[torch.Tensor], torch.Tensor] | None = None,
              keep_padded: bool = False, per_column: bool = True) -> torch.Tensor:
    """A head in fp32 on the read rows, as one GEMM per tile of rows (a lone row would take another kernel) and per
    output (so a head's column has the same bits whatever other heads share the backbone), then its activation on
    the padded tiles (aligned chunks): (len(rows), out), or the padded tiles."""
    picked = hidden[torch.as_tensor(list(rows), dtype=torch.long, device=hidden.device)].float()
    n = picked.shape[0]
    tiles = aligned_count(-(-n // TILE), TILE * weight.shape[0])
    padded = F.pad(picked, (0, 0, 0, tiles * TILE - n))
    w = weight.float()
    b = None if bias is None else bias.float()
    if per_column:
        columns = [torch.cat([F.linear(t, w[k:k + 1], None if b is None else b[k:k + 1]) for t in padded.split(TILE)])
                   for k in range(w.shape[0])]
        out = torch.cat(columns, dim=1)
    else:
        out = torch.cat([F.linear(t, w, b) for t in padded.split(TILE)])
    if activation is not None:
        out = activation(out)
    return out if keep_padded else out[:n]


# ---- norms and attention ----------------------------------------------------------------------------------
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm in fp32 (x: the fp32 residual stream). The one transcendental step runs over one value per
    row; it is computed on a copy padded to aligned thread chunks (rule 2), so the pass's row count needs no
    alignment of its own (which would round every pass up to 64 rows)."""
    mean_square = x.pow(2).mean(-1)  # (R,): one reduction per row, of a fixed length
    rows = mean_square.shape[0]
    padded = F.pad(mean_square, (0, aligned_count(rows, 1, step=VECTOR_BLOCK) - rows), value=1.0)
    normed = x * torch.rsqrt(padded + eps)[:rows, None]
    normed *= weight
    return normed


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary embedding, x * cos + rotate_half(x) * sin, without building rotate_half(x): the same bits
    (a + (-b)c == a - bc exactly), written per half into one output. x: (R, heads, D) fp32; cos, sin: (R, 1, D)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    out = x * cos
    out[..., :half] -= x2 * sin[..., :half]
    out[..., half:] += x1 * sin[..., half:]
    return out


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, work: Work, scale: float) -> torch.Tensor:
    """Attention by query tiles (rule 3). q: (R, Hq, D); k, v: (R, Hkv, D), fp32 -> (R, Hq, D); rows that are no
    work item's query are left zero.

    A query tile at absolute positions [aT, (a+1)T) of a decoder always attends a key buffer of exactly (a+1)T
    slots, gathered by absolute position from wherever the keys live in this pass (its own rows, or a shared
    prefix's), slots it may not see masked out (they get an exact zero weight, whatever they hold). So its SDPA
    call has the same shape, the same kernel blocking and the same numbers whether the input is alone, packed
    with others, or under a shared prefix. An encoder's sequence (never grouped) is one item: all its queries,
    its length padded to whole ROW_TILEs, against its keys, so its keys are gathered once, not once per tile. Items
    of the same shape are computed in one batched call (a batch entry's result does not depend on the others).
    Causality is in the masks, built with the layout (`tile_layout(causal=...)`)."""
    rows, heads, dim = q.shape
    kv_heads = k.shape[1]
    out = torch.zeros_like(q)
    for g in work.groups:
        n, length = g.tiles, g.length
        qg = q.index_select(0, g.q_index).view(n, g.queries, heads, dim).transpose(1, 2)  # (n, Hq, Q, D)
        kg = k.index_select(0, g.kv_index).view(n, length, kv_heads, dim).transpose(1, 2)  # (n, Hkv, L, D)
        vg = v.index_select(0, g.kv_index).view(n, length, kv_heads, dim).transpose(1, 2)
        gqa = heads != kv_heads
        if gqa and q.is_cuda:  # CUDA's masked (memory-efficient) kernel takes no GQA; the math fallback is slow
            kg, vg = kg.repeat_interleave(heads // kv_heads, dim=1), vg.repeat_interleave(heads // kv_heads, dim=1)
            gqa = False
        attended = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale,
                                                  enable_gqa=gqa)  # (n, Hq, Q, D)
        flat = attended.transpose(1, 2).reshape(n * g.queries, heads, dim)
        out.index_copy_(0, g.dest, flat.index_select(0, g.src))
    return out


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "swish": F.silu, "gelu": F.gelu, "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu,
}
