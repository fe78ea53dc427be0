"""Shared-prefix groups: inputs that start with the same tokens (one prompt's N candidates, a GRPO group,
chosen + rejected) are scored together, their common prefix computed once. Pure planning, no torch.

- `find_groups` sorts a window's token-id lists lexicographically: inputs sharing >= m leading tokens are
  then neighbours, so the best partition into groups (most prefix tokens computed once, each group's
  prefix >= `min_prefix`) is a partition into contiguous runs, found exactly by dynamic programming.
- `plan_grouped_batches` cuts those groups (and the inputs left alone) into forward passes by count and
  token budget, where a group costs its prefix once plus its members' suffixes; a group too big for one
  pass is split into chunks that each carry the prefix.

A backend receives a `PlannedBatch`: the token-id lists of one pass (a plain list to any backend that
ignores plans), its `groups` (member indices into that list) and its `layout`.

- `prefix_tree_layout` is how a packed backend lays one pass out: a radix tree (compressed trie) of the pass's
  inputs, every edge of at least `min_shared` tokens that two or more inputs share computed ONCE, at every
  depth. So sharing nests: a chat template's system header common to a whole pass, then each prompt common to
  its candidates (or to chosen + rejected), then the candidates' own tokens. The groups decide which inputs go
  to the same pass; the tree decides what each pass computes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Group:
    prefix_len: int
    """Leading tokens every member shares: computed once for the whole group."""
    members: tuple[int, ...]
    """Indices of the members in their batch (two or more)."""


@dataclass(frozen=True)
class Segment:
    start: int
    end: int
    """Row positions [start, end) of this segment's tokens in the packed row."""
    context: tuple[tuple[int, int], ...]
    """Row ranges of its ancestors' segments, root first: the tokens it attends before its own (causally)."""


@dataclass(frozen=True)
class TreeLayout:
    """One packed row for a pass: token ids, position ids, attention segments in row order, and for each input
    the row index of its last token (where its reward is read)."""

    ids: list[int]
    positions: list[int]
    segments: list[Segment]
    read: list[int]
    saved: int
    """Input tokens not computed (the inputs' total length minus the row's length)."""
    shared_inputs: int
    """Inputs that read at least one shared segment."""


def prefix_tree_layout(seqs: Sequence[Sequence[int]], min_shared: int) -> TreeLayout:
    """Lay `seqs` out as a radix tree: an edge (run of tokens) shared by two or more inputs becomes one segment
    when it is at least `min_shared` tokens long (shorter ones are copied into each child, where they cost less
    than a segment of their own would). Identical inputs are always computed once. `min_shared` <= 0: no
    sharing, one segment per input."""
    ids: list[int] = []
    positions: list[int] = []
    segments: list[Segment] = []
    read = [-1] * len(seqs)
    shared_inputs = 0

    def emit(tokens: Sequence[int], depth: int, context: tuple[tuple[int, int], ...]) -> int:
        start = len(ids)
        ids.extend(tokens)
        positions.extend(range(depth, depth + len(tokens)))
        segments.append(Segment(start, len(ids), context))
        return len(ids) - 1

    if any(len(seq) == 0 for seq in seqs):
        raise ValueError("cannot lay out an empty input")
    if min_shared <= 0 or len(seqs) < 2:
        for i, seq in enumerate(seqs):
            read[i] = emit(seq, 0, ())
        return TreeLayout(ids, positions, segments, read, 0, 0)
    order = sorted(range(len(seqs)), key=lambda i: list(seqs[i]))
    lcp = [common_prefix_len(seqs[order[k]], seqs[order[k + 1]]) for k in range(len(order) - 1)]

    # Iterative depth-first walk over runs order[lo:hi] that share their first `depth` tokens (already laid
    # out in `context`, whose last token is row index `last`, or -1 at the root).
    stack: list[tuple[int, int, int, tuple[tuple[int, int], ...], int]] = [(0, len(order), 0, (), -1)]
    while stack:
        lo, hi, depth, context, last = stack.pop()
        if hi - lo == 1:
            i = order[lo]
            if len(seqs[i]) == depth:
                read[i] = last  # the input IS the shared prefix laid out above it
            else:
                read[i] = emit(seqs[i][depth:], depth, context)
            if context:
                shared_inputs += 1
            continue
        common = min(lcp[lo:hi - 1])  # tokens the whole run shares
        first = seqs[order[lo]]
        identical = common == len(first) == len(seqs[order[hi - 1]])
        if common > depth and (common - depth >= min_shared or identical):
            end = emit(first[depth:common], depth, context)
            context, last, depth = context + ((segments[-1].start, segments[-1].end),), end, common
        children: list[tuple[int, int]] = []  # two or more: some neighbours share exactly `common`
        start = lo
        for k in range(lo, hi - 1):  # split where neighbours share no more than `common`
            if lcp[k] <= common:
                children.append((start, k + 1))
                start = k + 1
        children.append((start, hi))
        for child_lo, child_hi in reversed(children):  # reversed: popped in sorted order
            stack.append((child_lo, child_hi, depth, context, last))
    saved = sum(len(s) for s in seqs) - len(ids)
    return TreeLayout(ids, positions, segments, read, saved, shared_inputs)


class PlannedBatch(list):
    """The token-id lists of one forward pass, plus the prefix groups among them and its radix-tree layout.

    `min_shared`: the shortest shared edge worth its own segment (the batcher passes its `group_min_prefix`);
    None derives it from `groups` (their shortest prefix; no sharing without groups)."""

    def __init__(self, seqs: Iterable[Sequence[int]] = (), groups: Sequence[Group] = (),
                 min_shared: int | None = None, reads: Sequence[tuple[int, ...] | None] | None = None):
        super().__init__(seqs)
        self.groups: tuple[Group, ...] = tuple(groups)
        self.reads: list[tuple[int, ...] | None] = list(reads) if reads is not None else [None] * len(self)
        """Per input, the positions whose outputs are read (None: its last token; a PRM: every step end)."""
        if min_shared is None:
            min_shared = min((g.prefix_len for g in self.groups), default=0)
        self.min_shared = min_shared
        self._layout: TreeLayout | None = None

    @property
    def layout(self) -> TreeLayout:
        """The pass as a radix tree (computed once)."""
        if self._layout is None:
            self._layout = prefix_tree_layout(self, self.min_shared)
        return self._layout

    @property
    def saved_tokens(self) -> int:
        """Input tokens not computed thanks to shared prefixes, at every level of the tree."""
        return self.layout.saved if self.min_shared > 0 else 0

    @property
    def shared_inputs(self) -> int:
        """Inputs that read a shared prefix."""
        return self.layout.shared_inputs if self.min_shared > 0 else 0


def input_rows(layout: TreeLayout, i: int) -> list[int]:
    """The rows of input i in a tree layout, in position order (its ancestors' segments, then its own up to its
    read row)."""
    last = layout.read[i]
    lo, hi = 0, len(layout.segments) - 1
    while lo < hi:  # the segment holding the last row (segments are in row order)
        mid = (lo + hi + 1) // 2
        if layout.segments[mid].start <= last:
            lo = mid
        else:
            hi = mid - 1
    seg = layout.segments[lo]
    rows = [r for s, e in seg.context for r in range(s, e)]
    rows.extend(range(seg.start, last + 1))
    return rows


def read_rows(layout: TreeLayout, reads: Sequence[tuple[int, ...] | None]) -> list[list[int]]:
    """Per input, the layout rows to read: its last row, or the rows at the given positions."""
    out = []
    for i, positions in enumerate(reads):
        if positions is None:
            out.append([layout.read[i]])
        else:
            rows = input_rows(layout, i)
            out.append([rows[p] for p in positions])
    return out


@dataclass
class BatchResult:
    """What a backend answers for a PlannedBatch: per input, in order, its raw outputs at the read positions, an
    array (reads, outputs) (a reward model: one read, one output per head), and, when it shares prefixes its own
    way (vLLM's prefix cache) rather than by the batch's tree layout, what it really saved."""

    values: list[Any]
    saved_tokens: int | None = None
    """Input tokens not computed; None: the batch's tree layout says (`PlannedBatch.saved_tokens`)."""
    shared_inputs: int | None = None
    """Inputs that read a shared prefix; None: the tree layout says."""


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix (binary search over slice comparisons: C speed)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo], a[:hi+1] != b[:hi+1]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def find_groups(seqs: Sequence[Sequence[int]], min_prefix: int) -> list[tuple[int, list[int]]]:
    """Partition range(len(seqs)) into (prefix_len, indices); prefix_len 0 for an input left alone."""
    n = len(seqs)
    if min_prefix <= 0 or n < 2:
        return [(0, [i]) for i in range(n)]
    order = sorted(range(n), key=lambda i: list(seqs[i]))
    lcp = [common_prefix_len(seqs[order[k]], seqs[order[k + 1]]) for k in range(n - 1)]  # neighbours
    # best[j]: most tokens saved over the first j sorted inputs; cut[j]: (start of the last run, its prefix)
    best = [0] * (n + 1)
    cut: list[tuple[int, int]] = [(0, 0)] * (n + 1)
    for j in range(1, n + 1):
        best[j], cut[j] = best[j - 1], (j - 1, 0)  # input j-1 alone
        shared = None
        for i in range(j - 2, -1, -1):  # the run order[i..j-1] shares min(lcp[i..j-2]) tokens
            shared = lcp[i] if shared is None else min(shared, lcp[i])
            if shared < min_prefix:
                break
            gain = best[i] + (j - 1 - i) * shared
            if gain > best[j]:
                best[j], cut[j] = gain, (i, shared)
    parts: list[tuple[int, list[int]]] = []
    j = n
    while j > 0:
        i, shared = cut[j]
        parts.append((shared, sorted(order[i:j])))
        j = i
    parts.reverse()
    return parts


@dataclass
class _Unit:
    items: list[Any]
    prefix_len: int
    cost: int


def _chunks(items: list[Any], prefix_len: int, max_count: int, max_tokens: int) -> list[_Unit]:
    """A group's members in chunks that fit one pass (each chunk pays the prefix once)."""
    units: list[_Unit] = []
    current: list[Any] = []
    cost = prefix_len
    for item in sorted(items, key=lambda it: list(it.ids)):  # trie order: nested sharers stay in one chunk
        extra = item.length - prefix_len
        if current and (len(current) >= max_count or cost + extra > max_tokens):
            units.append(_Unit(current, prefix_len, cost))
            current, cost = [], prefix_len
        current.append(item)
        cost += extra
    units.append(_Unit(current, prefix_len, cost))
    return [u if len(u.items) > 1 else _Unit(u.items, 0, u.items[0].length) for u in units]


def plan_grouped_batches(
    items: list[Any], max_batch_size: int, max_batch_tokens: int, min_prefix: int
) -> list[tuple[list[Any], tuple[Group, ...]]]:
    """Batches (items, groups) for a packed backend; items need `.ids` and `.length`. Cheapest passes first."""
    units: list[_Unit] = []
    for prefix_len, indices in find_groups([it.ids for it in items], min_prefix):
        members = [items[i] for i in indices]
        if prefix_len:
            units.extend(_chunks(members, prefix_len, max_batch_size, max_batch_tokens))
        else:
            units.append(_Unit(members, 0, members[0].length))
    batches: list[tuple[list[Any], tuple[Group, ...]]] = []
    current: list[_Unit] = []
    count = cost = 0
    for unit in sorted(units, key=lambda u: u.cost):
        if current and (count + len(unit.items) > max_batch_size or cost + unit.cost > max_batch_tokens):
            batches.append(_assemble(current))
            current, count, cost = [], 0, 0
        current.append(unit)
        count += len(unit.items)
        cost += unit.cost
    if current:
        batches.append(_assemble(current))
    return batches


def _assemble(units: list[_Unit]) -> tuple[list[Any], tuple[Group, ...]]:
    items: list[Any] = []
    groups: list[Group] = []
    for unit in units:
        if unit.prefix_len:
            groups.append(Group(unit.prefix_len, tuple(range(len(items), len(items) + len(unit.items)))))
        items.extend(unit.items)
    return items, tuple(groups)


def restrict(groups: Sequence[Group], kept: Sequence[int]) -> tuple[Group, ...]:
    """The groups of a batch after some of its inputs were dropped; `kept` are the old indices that remain,
    in their new order. A group left with one member is no group."""
    new_index = {old: new for new, old in enumerate(kept)}
    out = []
    for g in groups:
        members = tuple(new_index[m] for m in g.members if m in new_index)
        if len(members) > 1:
            out.append(Group(g.prefix_len, members))
    return tuple(out)
