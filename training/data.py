"""Preference data: files or datasets in the usual formats -> PreferencePair records -> padded batches.

Every pair becomes two rewardserve inputs `{"messages": [...]}` whose last message is the assistant's, and the
collator tokenizes them with `rewardmodel.rendering.encode_input`, the very function the server uses, so a trained
model reads exactly the ids it will be served (no train/serve skew).

Accepted records (TRL column conventions, plus Anthropic HH-RLHF):
- HH-RLHF dialogues   {"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": "..."}
- explicit prompt     {"prompt": str, "chosen": str, "rejected": str}
- conversational      {"prompt": [messages], "chosen": [messages], "rejected": [messages]}
- implicit prompt     {"chosen": [messages], "rejected": [messages]}
each with an optional finite numeric "margin" (on every record of a source, or on none). The prompt of an
implicit-prompt record is the longest common prefix of the two conversations, as in TRL's `extract_prompt`, so each
side keeps its own full conversation even when the two sides' histories differ (5 of the 2,312 upstream HH
harmless-base test pairs).
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, TypeVar

import torch

from rewardmodel.rendering import Encoded, encode_input

log = logging.getLogger("rewardserve.train.data")

Message = dict[str, str]
ROLES = ("system", "user", "assistant")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# A turn marker starts the text or follows a blank line; "Human:" inside a turn's text is content.
_HH_MARKER = re.compile(r"(?:^|\n\n)(Human|Assistant):")


@dataclass(frozen=True)
class PreferencePair:
    """A shared prompt and two completions; each completion is one or more messages ending with the assistant's."""

    prompt_messages: list[Message]
    chosen: list[Message]
    rejected: list[Message]
    margin: float | None = None

    def chosen_input(self) -> dict[str, list[Message]]:
        """The chosen side as a rewardserve input (what a client would send to /score)."""
        return {"messages": [*self.prompt_messages, *self.chosen]}

    def rejected_input(self) -> dict[str, list[Message]]:
        return {"messages": [*self.prompt_messages, *self.rejected]}


# ----------------------------------------------------------------------------------------------- parsing


def parse_hh_dialogue(text: str) -> list[Message]:
    """'\\n\\nHuman: a\\n\\nAssistant: b' -> [user a, assistant b]; turn text is stripped of outer whitespace."""
    parts = _HH_MARKER.split(text.lstrip())  # [before, speaker, text, speaker, text, ...]
    if parts[0].strip() or len(parts) < 3:
        raise ValueError("not an HH dialogue: it must start with a 'Human:' or 'Assistant:' turn")
    return [{"role": HH_ROLES[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def _looks_like_hh(text: str) -> bool:
    return bool(_HH_MARKER.match(text.lstrip()))


def _messages(value: Any, what: str) -> list[Message]:
    """Validated [{role, content}] (other keys dropped) from a list of message dicts."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what}: expected a non-empty list of messages")
    out = []
    for i, msg in enumerate(value):
        if not isinstance(msg, Mapping) or msg.get("role") not in ROLES or not isinstance(msg.get("content"), str):
            raise ValueError(f"{what}[{i}]: expected {{'role': one of {ROLES}, 'content': str}}")
        out.append({"role": msg["role"], "content": msg["content"]})
    return out


def _split_common_prompt(chosen: list[Message], rejected: list[Message]) -> tuple[list[Message], ...]:
    """(prompt, chosen rest, rejected rest): the longest shared prefix, leaving each side at least one message."""
    n = 0
    limit = min(len(chosen), len(rejected)) - 1
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _side(value: Any, what: str) -> list[Message]:
    """A completion: a string is one assistant message; a list is messages."""
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    return _messages(value, what)


def _full_conversations(record: Mapping[str, Any]) -> tuple[list[Message], list[Message], list[Message] | None]:
    """(chosen, rejected, explicit prompt or None) as message lists."""
    chosen, rejected, prompt = record["chosen"], record["rejected"], record.get("prompt")
    if prompt is None:
        if isinstance(chosen, str) and isinstance(rejected, str):
            if not (_looks_like_hh(chosen) and _looks_like_hh(rejected)):
                raise ValueError("chosen and rejected are plain text with no 'prompt' and no HH dialogue "
                                 "('\\n\\nHuman: ...\\n\\nAssistant: ...'): add a 'prompt' field (TRL's "
                                 "implicit-prompt text format is not read; conversations as message lists are)")
            return parse_hh_dialogue(chosen), parse_hh_dialogue(rejected), None
        return _messages(chosen, "chosen"), _messages(rejected, "rejected"), None
    if isinstance(prompt, str) and _looks_like_hh(prompt) and isinstance(chosen, str) and isinstance(rejected, str):
        # HH-style text split into prompt "...\n\nAssistant:" and completion " ...": parse the joined dialogue.
        return parse_hh_dialogue(prompt + chosen), parse_hh_dialogue(prompt + rejected), None
    if isinstance(prompt, str):
        prompt_msgs = [{"role": "user", "content": prompt}]
    else:
        prompt_msgs = _messages(prompt, "prompt")
    return _side(chosen, "chosen"), _side(rejected, "rejected"), prompt_msgs


class NotAnObject(ValueError):
    """A record that is no JSON object (a string, a number, a list, null); `str(exc)` reads "is not a JSON object
    (got ...)", which parse_records puts after "<kind> record <i> "."""


_JSON_KINDS = ((bool, "a boolean"), (str, "a string"), (int, "a number"), (float, "a number"), (list, "a list"),
               (tuple, "a list"), (type(None), "null"))


def require_object(record: Any) -> Mapping[str, Any]:
    """The record itself when it is a JSON object (a mapping); NotAnObject otherwise, saying what it is."""
    if isinstance(record, Mapping):
        return record
    kind = next((name for t, name in _JSON_KINDS if isinstance(record, t)), type(record).__name__)
    raise NotAnObject(f"is not a JSON object (got {kind})")


def parse_margin(value: Any) -> float | None:
    """The optional margin as a finite float: a number or a numeric string; NaN and infinities are refused."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"margin must be a number, got {value!r}")
    try:
        margin = float(value)
    except ValueError:
        raise ValueError(f"margin must be a number, got {value!r}") from None
    if not math.isfinite(margin):
        raise ValueError(f"margin must be a finite number, got {value!r}")
    return margin


def parse_record(record: Mapping[str, Any]) -> PreferencePair:
    """One record in any accepted format -> PreferencePair (ValueError says what is wrong)."""
    record = require_object(record)
    if "chosen" not in record or "rejected" not in record:
        raise ValueError(f"a preference record needs 'chosen' and 'rejected'; got keys {sorted(record)}")
    chosen, rejected, prompt = _full_conversations(record)
    if prompt is None:
        prompt, chosen, rejected = _split_common_prompt(chosen, rejected)
    for name, side in (("chosen", chosen), ("rejected", rejected)):
        if side[-1]["role"] != "assistant":
            raise ValueError(f"{name}: the last message must be the assistant's (the response being scored)")
    return PreferencePair(list(prompt), chosen, rejected, parse_margin(record.get("margin")))


# ----------------------------------------------------------------------------------------------- reading


def _read_text(path: Path) -> str:
    """Text of a (gzipped) file; utf-8-sig reads a leading byte-order mark as nothing (Windows editors write one).
    A file that is not gzip (though named .gz), a truncated gzip file or bytes that are not UTF-8 are refused naming
    the file (and the line of the first bad byte)."""
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: not a readable gzip file ({exc})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") \
            from None


def _read_json_or_jsonl(path: Path) -> tuple[list[Any], list[int] | None]:
    """(rows, the line of each row): a JSON list (lines None), or one JSON value per line (blank lines skipped)."""
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            return list(json.loads(text)), None
        except json.JSONDecodeError as exc:
            if exc.msg != "Extra data":  # "Extra data": a JSONL file whose first line is a list, read line by line
                raise ValueError(f"{path}: not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    rows, lines = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                _refuse_one_object(path, text)
                raise ValueError(f"{path}:{lineno}: not JSON ({exc.msg})") from None
            lines.append(lineno)
    return rows, lines


def _refuse_one_object(path: Path, text: str) -> None:
    """A file holding one JSON object over several lines (pretty-printed) is no list of records: say so."""
    if not text.lstrip().startswith("{"):
        return
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return
    keys = f" with keys {sorted(value)[:5]}" if isinstance(value, dict) else ""
    raise ValueError(f"{path}: a JSON object{keys}, expected a list of records or JSON lines (one record per line)")


def _read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with `datasets` (the [train] extra)
        raise ImportError("reading parquet needs pyarrow: pip install 'rewardserve[train]'") from None
    return pq.read_table(path).to_pylist()


def _read_saved_dataset(path: Path) -> list[Mapping[str, Any]]:
    """Rows of a folder written by `datasets.Dataset.save_to_disk`; a saved DatasetDict names its splits."""
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise ValueError(f"{path} holds a DatasetDict with splits {splits}: give one split's folder, "
                         f"e.g. {path / (splits[0] if splits else 'train')}")
    if not (path / "state.json").is_file() or not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(f"{path} is a folder but no saved dataset (datasets' save_to_disk writes "
                                "state.json and dataset_info.json); give a data file or such a folder")
    from datasets import load_from_disk

    return list(load_from_disk(str(path)))


@dataclass(frozen=True)
class Records:
    """The rows of a source and where each came from: a file's rows are counted from 1 (and a JSON-lines file's
    also by their line), a Python sequence's by their index, as Python counts."""

    rows: list[Any]
    path: Path | None = None  # the file or folder; None for rows given in memory
    lines: list[int] | None = None  # the line of each row of a JSON-lines file

    def where(self, i: int, kind: str) -> str:
        """'<file>:<line>: <kind> record <n>' (a JSON-lines file), '<file>: <kind> record <n>' (another file, n from
        1), '<kind> record <i>' (rows in memory, i an index)."""
        if self.path is None:
            return f"{kind} record {i}"
        at = f"{self.path}:{self.lines[i]}" if self.lines else str(self.path)
        return f"{at}: {kind} record {i + 1}"

    def short(self, i: int) -> str:
        """'record <n>' (with its line in a JSON-lines file): the second record of a message that named the first."""
        if self.path is None:
            return f"record {i}"
        return f"record {i + 1}" + (f" (line {self.lines[i]})" if self.lines else "")

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else "the given records"


def read_located(source: str | Path | Iterable[Mapping[str, Any]]) -> Records:
    """read_records, keeping where each row came from (for messages that name a record)."""
    if isinstance(source, Mapping):
        raise TypeError("got a mapping (a DatasetDict?): pass one split, e.g. dataset['train']")
    if not isinstance(source, (str, Path)):
        return Records(list(source))  # datasets.Dataset / IterableDataset iterate rows as dicts
    path = Path(source)
    if path.is_dir():
        return Records(_read_saved_dataset(path), path)
    if not path.is_file():
        raise FileNotFoundError(f"no data file or saved dataset at {path}")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes[-1:] == [".parquet"]:
        return Records(_read_parquet(path), path)
    if any(s in (".jsonl", ".json") for s in suffixes[-2:]):
        return _records_of_json(path)
    raise ValueError(f"{path}: unknown format; use .jsonl, .json, .jsonl.gz, .json.gz, .parquet or a folder saved "
                     "by datasets' save_to_disk")


def _records_of_json(path: Path) -> Records:
    rows, lines = _read_json_or_jsonl(path)
    return Records(rows, path, lines)


def read_records(source: str | Path | Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Rows from a .jsonl / .json / .parquet file (.gz for JSON), a folder saved by `datasets.Dataset.save_to_disk`,
    a `datasets.Dataset` or an iterable of dicts."""
    return read_located(source).rows


T = TypeVar("T")


def parse_located(source: str | Path | Iterable[Any], parse: Callable[[Any], T], kind: str
                  ) -> tuple[list[T], Records]:
    """(parse(record) for every record of a source, the records read); a bad record fails naming it (the file and
    its line, or its index: Records.where)."""
    records = read_located(source)
    out = []
    for i, record in enumerate(records.rows):
        try:
            out.append(parse(record))
        except NotAnObject as exc:
            raise ValueError(f"{records.where(i, kind)} {exc}") from None
        except (ValueError, TypeError, KeyError) as exc:
            raise ValueError(f"{records.where(i, kind)}: {exc}") from None
    return out, records


def parse_records(source: str | Path | Iterable[Any], parse: Callable[[Any], T], kind: str) -> list[T]:
    """parse(record) for every record of a source; a bad record fails naming it: "<file>:<line>: <kind> record <n>:
    ..." for a JSON-lines file, "<file>: <kind> record <n>: ..." for another file (n from 1), "<kind> record <i>: ..."
    for records given in memory (i an index)."""
    return parse_located(source, parse, kind)[0]


def require_records(items: Sequence[Any], source: Any, flag: str) -> Sequence[Any]:
    """`items` read from `source`, given as `flag`; an empty source is refused (a given file is never ignored)."""
    if not items:
        raise ValueError(f"{flag} {source} holds no records")
    return items


def check_margins(pairs: Sequence[PreferencePair], records: Records | None = None) -> None:
    """Margins on every pair or on none: a batch cannot mix the two (the loss would change meaning mid-epoch).
    records: where the pairs came from, for the message (default: a sequence in memory)."""
    if not pairs:
        return
    records = records or Records(list(pairs))
    first = pairs[0].margin is not None
    for i, pair in enumerate(pairs):
        if (pair.margin is not None) != first:
            has, lacks = (0, i) if first else (i, 0)
            raise ValueError(f"{records.where(lacks, 'preference')} has no margin but {records.short(has)} has one: "
                             "give every pair a margin, or none")


def identical_pairs(pairs: Sequence[PreferencePair]) -> int:
    """How many pairs have a chosen side equal to the rejected one (they add nothing to a preference loss)."""
    return sum(p.chosen_input() == p.rejected_input() for p in pairs)


def load_preferences(source: str | Path | Iterable[Mapping[str, Any]]) -> list[PreferencePair]:
    """All records of a source as PreferencePairs; a bad record fails naming it, and so does the first record that
    has a margin where the first record has none (or the other way round). Pairs whose chosen side equals the
    rejected one are kept, with a warning that counts them."""
    pairs, records = parse_located(source, parse_record, "preference")
    check_margins(pairs, records)
    same = identical_pairs(pairs)
    if same:
        log.warning("%s: %d of %d pairs have a chosen side identical to the rejected one (kept; they carry no "
                    "preference)", records.name, same, len(pairs))
    return pairs


# ---------------------------------------------------------------------------------------------- batching


@dataclass
class PreferenceBatch:
    """B pairs as one right-padded batch of 2B rows: rows [0, B) chosen, rows [B, 2B) rejected (as TRL)."""

    input_ids: torch.Tensor  # (2B, T) long
    attention_mask: torch.Tensor  # (2B, T) long, 1 on real tokens
    truncated: torch.Tensor  # (2B,) bool: the row was cut from the left to fit max_length
    margin: torch.Tensor | None = None  # (B,) float32, when the pairs carry margins

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        move = lambda x: None if x is None else x.to(device)  # noqa: E731
        return PreferenceBatch(move(self.input_ids), move(self.attention_mask), move(self.truncated), move(self.margin))


def pad_right(rows: Sequence[Sequence[int]], pad_id: int, multiple_of: int | None = None) -> tuple[torch.Tensor, ...]:
    """(input_ids, attention_mask), each (N, T), T the longest row rounded up to `multiple_of`."""
    width = max(len(r) for r in rows)
    if multiple_of:
        width = -(-width // multiple_of) * multiple_of
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (N, T)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.as_tensor(row, dtype=torch.long)  # a list or an int32 tensor
        mask[i, : len(row)] = 1
    return ids, mask


def _margins(pairs: Sequence[PreferencePair]) -> torch.Tensor | None:
    given = [p.margin is not None for p in pairs]
    if not any(given):
        return None
    if not all(given):
        raise ValueError("some pairs in the batch have a margin and some do not")
    return torch.tensor([p.margin for p in pairs], dtype=torch.float32)  # (B,)


@dataclass(frozen=True)
class Truncation:
    """What cutting to max_length did to a set of pairs."""

    pairs: int
    rows_truncated: int  # of 2 * pairs rows
    pairs_truncated: int  # pairs with at least one side cut
    pairs_made_identical: int  # pairs whose two sides became the same ids by the cut

    def report(self, name: str, max_length: int) -> None:
        """Log the counts for the data source `name`: info when nothing became identical, else a warning."""
        if not self.pairs_truncated:
            return
        log.info("%s: %d of %d rows (%d of %d pairs) cut to max_length %d (their start dropped)", name,
                 self.rows_truncated, 2 * self.pairs, self.pairs_truncated, self.pairs, max_length)
        if self.pairs_made_identical:
            log.warning("%s: %d of %d pairs are identical after truncation to max_length %d (the two sides differ "
                        "only in what was cut): they carry no preference; raise --max-length", name,
                        self.pairs_made_identical, self.pairs, max_length)


class PreferenceCollator:
    """Tokenizes pairs with `rewardmodel.rendering.encode_input` (left truncation) and right-pads them into one batch.

    Use as `DataLoader(pairs, batch_size=B, collate_fn=PreferenceCollator(tokenizer, max_length))`.
    `lengths(pairs)` (what the training loop's length-grouped order asks for) encodes the pairs once and keeps
    their ids, so later batches of those very pair objects skip tokenization; other pairs are encoded as they come.
    """

    def __init__(
        self, tokenizer: Any, max_length: int, pad_token_id: int | None = None, pad_to_multiple_of: int | None = None
    ):
        if max_length < 1:
            raise ValueError("max_length must be at least 1")
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.pad_to_multiple_of = pad_to_multiple_of
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "pad_token_id", None)
        if pad_token_id is None:
            pad_token_id = getattr(tokenizer, "eos_token_id", None)
        self.pad_token_id = 0 if pad_token_id is None else int(pad_token_id)  # never read: masked out
        # id(pair) -> (pair, chosen ids, chosen truncated, rejected ids, rejected truncated); the pair object is
        # kept so its id cannot be reused by another object while the entry exists. ids: int32 (compact).
        self._kept: dict[int, tuple[PreferencePair, torch.Tensor, bool, torch.Tensor, bool]] = {}

    def encode(self, pair: PreferencePair) -> tuple[Encoded, Encoded]:
        """(chosen, rejected) exactly as the server would encode each input."""
        return (
            encode_input(self.tokenizer, pair.chosen_input(), self.max_length),
            encode_input(self.tokenizer, pair.rejected_input(), self.max_length),
        )

    def _ids(self, pair: PreferencePair, keep: bool = False) -> tuple[Any, bool, Any, bool]:
        """(chosen ids, chosen truncated, rejected ids, rejected truncated), from what `lengths` kept if it can."""
        hit = self._kept.get(id(pair))
        if hit is not None and hit[0] is pair:
            return hit[1:]
        chosen, rejected = self.encode(pair)
        if not keep:
            return chosen.input_ids, chosen.truncated, rejected.input_ids, rejected.truncated
        c_ids, r_ids = (torch.tensor(e.input_ids, dtype=torch.int32) for e in (chosen, rejected))
        value = (c_ids, chosen.truncated, r_ids, rejected.truncated)
        self._kept[id(pair)] = (pair, *value)
        return value

    def truncation(self, pairs: Sequence[PreferencePair], keep: bool = False) -> "Truncation":
        """How many of `pairs` are cut to max_length (rows and pairs), and how many become two identical rows by it
        (a pair that was identical before is not counted: load_preferences warns about those). keep: keep the ids
        for later batches (as `lengths` does)."""
        rows = cut_pairs = became_same = 0
        for pair in pairs:
            c_ids, c_cut, r_ids, r_cut = self._ids(pair, keep)
            rows += c_cut + r_cut
            cut_pairs += c_cut or r_cut
            if (c_cut or r_cut) and len(c_ids) == len(r_ids) and list(c_ids) == list(r_ids):
                became_same += pair.chosen_input() != pair.rejected_input()
        return Truncation(len(pairs), rows, cut_pairs, became_same)

    def lengths(self, pairs: Sequence[PreferencePair]) -> list[int]:
        """Per pair, the token count of its longer side (a batch is padded to its longest row); keeps the ids."""
        return [max(len(c), len(r)) for c, _, r, _ in (self._ids(p, keep=True) for p in pairs)]

    def __call__(self, pairs: Sequence[PreferencePair]) -> PreferenceBatch:
        if not pairs:
            raise ValueError("cannot collate an empty list of pairs")
        encoded = [self._ids(p) for p in pairs]
        rows = [c for c, _, _, _ in encoded] + [r for _, _, r, _ in encoded]  # (2B,): chosen first, then rejected
        input_ids, attention_mask = pad_right(rows, self.pad_token_id, self.pad_to_multiple_of)
        flags = [t for _, t, _, _ in encoded] + [t for _, _, _, t in encoded]
        truncated = torch.tensor(flags, dtype=torch.bool)  # (2B,)
        return PreferenceBatch(input_ids, attention_mask, truncated, _margins(pairs))
