"""The frozen base's features for head-only training: each distinct token sequence computed once, kept in a store.

A head-only reward model reads one vector per input: the last real token's final hidden state (decoder bases) or
the first token's (BERT-style pooler heads), in fp32 (`Head.features` in training/rm_head.py). Preference data
repeats inputs a lot: the helpfulness pairs are ~40 pairs per prompt built from ~15 answers per prompt, so 10,380
pairs hold only ~3,500 distinct (prompt, answer) sequences. This module

- encodes every pair exactly as the server would (`PreferenceCollator.encode`) and keys each sequence by its token
  ids, so a sequence shared by many pairs (or by several datasets) is computed once;
- runs the distinct sequences through the frozen base shortest first, in batches filled up to a token budget
  (rows x longest row), so padding is small and short inputs go many to a batch;
- keeps the results in a FeatureStore file (`--feature-cache`): one row per distinct sequence, keyed by a digest of
  its ids, under a key naming the base weights digest, max_length, layer count and head kind. Any dataset rendered
  over the same base and max_length reuses the rows already there; the store is saved every few minutes during a
  long pass, so an interrupted pass resumes where it stopped.

`python -m training.features --base smollm2 --max-length 512 --store runs/features/smollm2-512.pt --data A B ...`
fills a store ahead of training (see docs/training.md).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from training.data import PreferenceCollator, PreferencePair
from training.frozen import store_key  # noqa: F401  (the store's key, re-exported)

log = logging.getLogger("rewardserve.train.features")

TOKEN_BUDGET = 4096  # padded tokens (rows x longest row) per frozen forward
MAX_ROWS = 64  # rows per forward at most (short inputs)
SAVE_EVERY_S = 180.0  # a long pass saves its store this often
STORE_FORMAT = 2


def sequence_key(ids: Sequence[int]) -> str:
    """A digest of a token sequence: the store's key for its feature row."""
    return hashlib.blake2b(torch.as_tensor(list(ids), dtype=torch.int32).numpy().tobytes(), digest_size=16).hexdigest()


class FeatureStore:
    """Feature rows (N, H) fp32 of distinct token sequences, under one key (base digest, max_length, layers, kind)."""

    def __init__(self, key: dict[str, Any], path: str | Path | None = None):
        self.key, self.path = dict(key), Path(path) if path else None
        self.index: dict[str, int] = {}
        self.rows: list[torch.Tensor] = []  # chunks of (n, H), concatenated on save / lookup
        self.dirty = False

    @classmethod
    def open(cls, path: str | Path | None, key: dict[str, Any]) -> "FeatureStore":
        """The store at `path` if it was made under `key`; else an empty one that will be saved there."""
        store = cls(key, path)
        if not path or not Path(path).exists():
            return store
        blob = torch.load(path, weights_only=True)
        if blob.get("format") != STORE_FORMAT or blob.get("key") != store.key:
            log.warning("features: %s was made by another base, max_length or cache format: starting it afresh", path)
            return store
        store.index = {k: i for i, k in enumerate(blob["keys"])}
        store.rows = [blob["features"]]
        return store

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def matrix(self) -> torch.Tensor:
        if len(self.rows) > 1:
            self.rows = [torch.cat(self.rows)]
        return self.rows[0] if self.rows else torch.empty(0)

    def add(self, keys: Sequence[str], feats: torch.Tensor) -> None:
        for k in keys:
            self.index[k] = len(self.index)
        self.rows.append(feats.detach().float().contiguous())
        self.dirty = True

    def lookup(self, keys: Sequence[str]) -> torch.Tensor:
        """(len(keys), H): the rows of these sequences (every one must be in the store)."""
        return self.matrix()[torch.tensor([self.index[k] for k in keys], dtype=torch.long)]

    def save(self) -> None:
        if self.path is None or not self.dirty:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.index, key=self.index.__getitem__)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        torch.save({"format": STORE_FORMAT, "key": self.key, "keys": keys, "features": self.matrix()}, tmp)
        os.replace(tmp, self.path)
        self.dirty = False


def encode_distinct(collate: PreferenceCollator, pairs: Sequence[PreferencePair]) -> tuple[list[list[int]], torch.Tensor]:
    """(distinct sequences, (P, 2) index of each pair's chosen and rejected sequence in that list)."""
    seen: dict[tuple[int, ...], int] = {}
    index = torch.empty((len(pairs), 2), dtype=torch.long)  # (P, 2)
    for p, pair in enumerate(pairs):
        for side, enc in enumerate(collate.encode(pair)):
            index[p, side] = seen.setdefault(tuple(enc.input_ids), len(seen))
    return [list(s) for s in seen], index


def encode_prompts(collate: PreferenceCollator, pairs: Sequence[Any]) -> tuple[list[list[int]], torch.Tensor]:
    """(distinct prompt-only sequences, (P,) index of each pair's): the pair's conversation with the response emptied,
    encoded exactly as the server encodes what a prompt-reading gate reads (rewardmodel.rendering.prompt_only).
    An item may also be a prompt alone: its messages (a list of {role, content})."""
    from rewardmodel.rendering import encode_input, prompt_only

    seen: dict[tuple[int, ...], int] = {}
    index = torch.empty(len(pairs), dtype=torch.long)
    for p, pair in enumerate(pairs):
        conversation = ({"messages": [*pair, {"role": "assistant", "content": ""}]} if isinstance(pair, list)
                        else pair.chosen_input())
        enc = encode_input(collate.tokenizer, prompt_only(conversation), collate.max_length)
        index[p] = seen.setdefault(tuple(enc.input_ids), len(seen))
    return [list(s) for s in seen], index


def length_batches(lengths: Sequence[int], budget: int = TOKEN_BUDGET, max_rows: int = MAX_ROWS) -> list[list[int]]:
    """Indices shortest first, cut into batches whose padded size (rows x longest) stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending, so the row being added is the batch's longest
        if current and ((len(current) + 1) * lengths[i] > budget or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def run_base(head: Any, rows: Sequence[Sequence[int]], pad_id: int, *, budget: int = TOKEN_BUDGET,
             progress: Callable[[int], None] | None = None,
             on_batch: Callable[[list[int], torch.Tensor], None] | None = None) -> torch.Tensor:
    """(N, H) features of `rows` through `head.features`, length-sorted batches; on_batch(indices, feats) after each."""
    from training.data import pad_right

    out: list[torch.Tensor | None] = [None] * len(rows)
    for idx in length_batches([len(r) for r in rows], budget):
        ids, mask = pad_right([rows[i] for i in idx], pad_id)  # (B, T) each
        feats = head.features(ids, mask)  # (B, H) fp32
        for j, f in zip(idx, feats):
            out[j] = f
        if on_batch:
            on_batch(idx, feats)
        if progress:
            progress(len(idx))
    if not rows:
        return torch.empty(0)
    return torch.stack(out)  # type: ignore[arg-type]


def fill_store(head: Any, store: FeatureStore, rows: Sequence[Sequence[int]], pad_id: int, *,
               progress: Callable[[int], None] | None = None, save_every_s: float = SAVE_EVERY_S) -> int:
    """Compute the rows the store lacks (saving it every save_every_s seconds); returns how many were computed."""
    keys = [sequence_key(r) for r in rows]
    missing = [i for i, k in enumerate(keys) if k not in store]
    missing = list({keys[i]: i for i in missing}.values())  # one per distinct key
    last_save = [time.time()]

    def keep(idx: list[int], feats: torch.Tensor) -> None:
        store.add([keys[missing[j]] for j in idx], feats)
        if time.time() - last_save[0] > save_every_s:
            store.save()
            last_save[0] = time.time()

    run_base(head, [rows[i] for i in missing], pad_id, progress=progress, on_batch=keep)
    store.save()
    return len(missing)


def pair_features(head: Any, collate: PreferenceCollator, pairs: Sequence[PreferencePair], store: FeatureStore, *,
                  progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """(P, 2, H) features of every pair's (chosen, rejected): distinct sequences only, reusing the store."""
    rows, index = encode_distinct(collate, pairs)
    done = fill_store(head, store, rows, collate.pad_token_id, progress=progress)
    log.info("features: %d pairs -> %d distinct sequences, %d computed, %d from the store", len(pairs), len(rows),
             done, len(rows) - done)
    feats = store.lookup([sequence_key(r) for r in rows])  # (S, H)
    return feats[index]  # (P, 2, H)


def stored_pair_features(collate: PreferenceCollator, pairs: Sequence[PreferencePair],
                         store: FeatureStore) -> torch.Tensor:
    """(P, 2, H) features read from the store only (no base model needed); KeyError names what is missing."""
    rows, index = encode_distinct(collate, pairs)
    keys = [sequence_key(r) for r in rows]
    missing = sum(k not in store for k in keys)
    if missing:
        raise KeyError(f"{missing} of {len(keys)} sequences are not in the feature store {store.path}: fill it first")
    return store.lookup(keys)[index]  # (P, 2, H)


def prompt_order(records: Sequence[Any], seed: int = 0) -> list[str]:
    """The distinct prompts of preference records (JSON of the prompt), in a seeded shuffled order."""
    import json
    import random

    from training.data import parse_record

    prompts = sorted({json.dumps(parse_record(r).prompt_messages) for r in records})
    random.Random(seed).shuffle(prompts)
    return prompts


def by_prompt(records: Sequence[Any], prompts: Sequence[str]) -> list[list[Any]]:
    """The records grouped by prompt, groups in the given prompt order (records keep their file order)."""
    import json

    from training.data import parse_record

    groups: dict[str, list[Any]] = {p: [] for p in prompts}
    for r in records:
        groups[json.dumps(parse_record(r).prompt_messages)].append(r)
    return [groups[p] for p in prompts]


def write_subset(src: str, dst: str, n_prompts: int, seed: int = 0) -> int:
    """Write the records of the first n_prompts prompts (seeded order) of src to dst (.jsonl or .jsonl.gz)."""
    import gzip
    import json

    from training.data import read_records

    records = read_records(src)
    keep = [r for group in by_prompt(records, prompt_order(records, seed))[:n_prompts] for r in group]
    opener = gzip.open if dst.endswith(".gz") else open
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    with opener(dst, "wt", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in keep)
    return len(keep)


def _fill_file(frozen: Any, store: FeatureStore, path: str, chunk_prompts: int | None, seed: int) -> None:
    """The sequences of one file into the store; with chunk_prompts, prompt by prompt (seeded order), chunk-wise,
    so a pass stopped early leaves the first prompts of that order complete."""
    from training.data import load_preferences, read_records

    records = read_records(path)
    t0 = time.time()
    if not chunk_prompts:
        pair_features(frozen.head, frozen.collate, load_preferences(records), store)
        log.info("features: %s: %d pairs in %.0f s (store: %d sequences)", path, len(records), time.time() - t0,
                 len(store))
        return
    groups = by_prompt(records, prompt_order(records, seed))
    for start in range(0, len(groups), chunk_prompts):
        chunk = [r for g in groups[start:start + chunk_prompts] for r in g]
        pair_features(frozen.head, frozen.collate, load_preferences(chunk), store)
        log.info("features: %s: prompts %d/%d done, %.0f s (store: %d sequences)", path,
                 min(start + chunk_prompts, len(groups)), len(groups), time.time() - t0, len(store))


def main(argv: Sequence[str] | None = None) -> int:
    """Fill a feature store with the sequences of several preference files (then `train rm --head-only` reuses it);
    or, with --write-subset, write the first --prompts prompts (seeded order) of one file."""
    parser = argparse.ArgumentParser(prog="python -m training.features", description=main.__doc__)
    parser.add_argument("--base", default="smollm2", help="minilm | smollm2 (default smollm2)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--num-layers", type=int)
    parser.add_argument("--read-layers", type=int, nargs="+", metavar="K",
                        help="store each sequence's features after each of these layer counts (as `train rm "
                        "--read-layers`; its own store key)")
    parser.add_argument("--store", help="the .pt store (as `train rm --feature-cache`)")
    parser.add_argument("--data", nargs="+", required=True, help="preference files, in the order to compute them")
    parser.add_argument("--chunk-prompts", type=int, help="go prompt by prompt (seeded order), this many per chunk")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt order (default 0)")
    parser.add_argument("--write-subset", metavar="FILE", help="write the first --prompts prompts of --data to FILE")
    parser.add_argument("--prompts", type=int, help="with --write-subset: how many prompts")
    parser.add_argument("--prompts-only", action="store_true",
                        help="fill the prompts instead (each pair's conversation with the response emptied: what "
                        "`train gate --reads prompt` and a prompt-reading gate read)")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.write_subset:
        n = write_subset(args.data[0], args.write_subset, args.prompts, args.seed)
        log.info("features: wrote %d records of the first %d prompts to %s", n, args.prompts, args.write_subset)
        return 0
    if not args.store:
        parser.error("--store is required")
    from training.frozen import load_frozen

    if args.threads:
        torch.set_num_threads(args.threads)
    frozen = load_frozen(args.base, args.max_length, args.num_layers, args.read_layers)
    store = FeatureStore.open(args.store, frozen.store_key)
    for path in args.data:
        if args.prompts_only:
            from training.data import load_preferences, read_records

            rows, _ = encode_prompts(frozen.collate, load_preferences(read_records(path)))
            done = fill_store(frozen.head, store, rows, frozen.collate.pad_token_id)
            log.info("features: %s: %d distinct prompts, %d computed (store: %d sequences)", path, len(rows), done,
                     len(store))
            continue
        _fill_file(frozen, store, path, args.chunk_prompts, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
