"""Preference data: every accepted format, every reader, the HH file, and the collator (no train/serve skew).

The HH file holds red-team text: tests on it assert on structure and counts only, never on (or printing) content.
"""

from __future__ import annotations

import copy
import gzip
import json
from pathlib import Path

import pytest
import torch

from rewardmodel.rendering import encode_input, render_plain
from service.schemas import parse_inputs
from training.data import (
    PreferenceBatch, PreferenceCollator, PreferencePair, load_preferences, pad_right, parse_hh_dialogue,
    parse_record, read_records,
)

HH_TRAIN = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "hh_harmless" / "train.jsonl.gz"


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def bot(text: str) -> dict:
    return {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rewardmodel.modeling import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))  # BERT: no chat template -> plain HH format


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """The same tokenizer with a small chat template, to cover the template branch of encode_input."""
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
    return tok


# ------------------------------------------------------------------------------------------- HH dialogues


def test_hh_dialogue_turns():
    text = (
        "\n\nHuman: What is a good name for a cat?\n\nAssistant: Maybe Whiskers."
        "\n\nHuman: Another?\n\nAssistant: Mittens."
    )
    assert parse_hh_dialogue(text) == [
        user("What is a good name for a cat?"), bot("Maybe Whiskers."), user("Another?"), bot("Mittens."),
    ]


def test_hh_dialogue_odd_whitespace():
    # no leading blank line, a third newline, double spaces, trailing spaces, an empty last turn
    text = "Human:  Hello there  \n\n\nAssistant:   Hi! \n\nHuman: Bye\n\nAssistant:"
    assert parse_hh_dialogue(text) == [user("Hello there"), bot("Hi!"), user("Bye"), bot("")]


def test_hh_marker_inside_text_is_content():
    text = "\n\nHuman: Write the word Human: twice\n\nAssistant: Human: Human:"
    assert parse_hh_dialogue(text) == [user("Write the word Human: twice"), bot("Human: Human:")]


@pytest.mark.parametrize("text", ["just text", "", "Preamble\n\nHuman: hi\n\nAssistant: yo"])
def test_not_an_hh_dialogue(text):
    with pytest.raises(ValueError):
        parse_hh_dialogue(text)


def test_hh_pair_shared_prefix():
    head = "\n\nHuman: Name a fruit.\n\nAssistant: Apple.\n\nHuman: A yellow one?\n\nAssistant:"
    pair = parse_record({"chosen": head + " Banana.", "rejected": head + " Grape."})
    prompt = [user("Name a fruit."), bot("Apple."), user("A yellow one?")]
    assert pair == PreferencePair(prompt, [bot("Banana.")], [bot("Grape.")])
    assert pair.chosen_input() == {"messages": [*pair.prompt_messages, bot("Banana.")]}
    assert pair.margin is None


def test_hh_pair_with_different_prefixes_keeps_each_side_whole():
    # As in a few upstream pairs: one side has two assistant turns at the end, the other one.
    chosen = "\n\nHuman: Count to two.\n\nAssistant: One.\n\nAssistant: Two."
    rejected = "\n\nHuman: Count to two.\n\nAssistant: Three."
    pair = parse_record({"chosen": chosen, "rejected": rejected})
    assert pair.prompt_messages == [user("Count to two.")]
    assert pair.chosen == [bot("One."), bot("Two.")]
    assert pair.rejected == [bot("Three.")]
    assert pair.chosen_input()["messages"] == parse_hh_dialogue(chosen)
    assert pair.rejected_input()["messages"] == parse_hh_dialogue(rejected)


def test_hh_pair_differing_from_the_first_turn_has_an_empty_prompt():
    pair = parse_record({"chosen": "\n\nHuman: A\n\nAssistant: B", "rejected": "\n\nHuman: C\n\nAssistant: D"})
    assert pair.prompt_messages == []
    assert pair.chosen == [user("A"), bot("B")] and pair.rejected == [user("C"), bot("D")]


def test_identical_sides_still_leave_a_response_each():
    pair = parse_record({"chosen": [user("q"), bot("a")], "rejected": [user("q"), bot("a")]})
    assert pair.prompt_messages == [user("q")] and pair.chosen == [bot("a")] and pair.rejected == [bot("a")]


# ------------------------------------------------------------------------------------------- TRL formats


def test_explicit_prompt_strings_with_margin():
    pair = parse_record({"prompt": "Sky colour?", "chosen": "Blue.", "rejected": "Green.", "margin": 2})
    assert pair == PreferencePair([user("Sky colour?")], [bot("Blue.")], [bot("Green.")], margin=2.0)
    assert isinstance(pair.margin, float)


def test_explicit_prompt_in_hh_style_is_parsed_as_a_dialogue():
    record = {"prompt": "\n\nHuman: Sky colour?\n\nAssistant:", "chosen": " Blue.", "rejected": " Green."}
    assert parse_record(record) == PreferencePair([user("Sky colour?")], [bot("Blue.")], [bot("Green.")])


def test_conversational_explicit_prompt():
    system = {"role": "system", "content": "Be brief."}
    record = {
        "prompt": [system, {"role": "user", "content": "Sky colour?", "name": "ann"}],  # extra keys are dropped
        "chosen": [bot("Blue.")],
        "rejected": [bot("Green.")],
    }
    pair = parse_record(record)
    assert pair == PreferencePair([system, user("Sky colour?")], [bot("Blue.")], [bot("Green.")])


def test_conversational_implicit_prompt():
    record = {
        "chosen": [user("Hi"), bot("Hello"), user("Sky colour?"), bot("Blue.")],
        "rejected": [user("Hi"), bot("Hello"), user("Sky colour?"), bot("Green.")],
        "margin": 0.5,
    }
    pair = parse_record(record)
    assert pair == PreferencePair([user("Hi"), bot("Hello"), user("Sky colour?")], [bot("Blue.")], [bot("Green.")], 0.5)


@pytest.mark.parametrize(
    "record",
    [
        {"chosen": "\n\nHuman: a\n\nAssistant: b"},  # no rejected
        {"prompt": "q", "chosen": [user("a")], "rejected": [bot("b")]},  # chosen ends with the user
        {"prompt": [{"role": "tool", "content": "x"}], "chosen": "a", "rejected": "b"},  # unknown role
        {"prompt": [{"role": "user", "content": ["part"]}], "chosen": "a", "rejected": "b"},  # content not a str
        {"prompt": [], "chosen": "a", "rejected": "b"},  # empty prompt list
        {"chosen": "plain text", "rejected": "other text"},  # implicit strings that are not HH dialogues
        {"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"},
    ],
)
def test_bad_records_are_refused(record):
    with pytest.raises(ValueError):
        parse_record(record)


# --------------------------------------------------------------------------------------------------- readers

RECORDS = [
    {"prompt": [user("Sky colour?")], "chosen": [bot("Blue.")], "rejected": [bot("Green.")], "margin": 1.0},
    {"prompt": [user("Grass colour?")], "chosen": [bot("Green.")], "rejected": [bot("Pink.")], "margin": 0.0},
]


def _write(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"prefs.{kind}"
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS) + "\n", encoding="utf-8")
    elif kind == "json":
        path.write_text(json.dumps(RECORDS), encoding="utf-8")
    elif kind == "jsonl.gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in RECORDS)
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(RECORDS), path)
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "jsonl.gz", "parquet"])
def test_every_file_format_reads_the_same_pairs(tmp_path, kind):
    expected = [parse_record(r) for r in RECORDS]
    assert load_preferences(_write(tmp_path, kind)) == expected
    assert load_preferences(str(_write(tmp_path, kind))) == expected


def test_datasets_dataset_and_plain_lists():
    from datasets import Dataset

    expected = [parse_record(r) for r in RECORDS]
    assert load_preferences(Dataset.from_list(RECORDS)) == expected
    assert load_preferences(RECORDS) == expected


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_records(tmp_path / "missing.jsonl")
    (tmp_path / "prefs.csv").write_text("chosen,rejected\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unknown format"):
        read_records(tmp_path / "prefs.csv")
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{oops\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_records(tmp_path / "bad.jsonl")
    with pytest.raises(TypeError, match="split"):
        read_records({"train": RECORDS})
    with pytest.raises(ValueError, match="record 1"):
        load_preferences([RECORDS[0], {"chosen": "x"}])


# ------------------------------------------------------------------------------------------- the HH file


@pytest.mark.skipif(not HH_TRAIN.exists(), reason="shared HH data not present")
def test_hh_train_file_parses_whole():
    pairs = load_preferences(HH_TRAIN)
    assert len(pairs) == 1512
    assert all(p.chosen[-1]["role"] == "assistant" and p.rejected[-1]["role"] == "assistant" for p in pairs)
    assert all(len(p.prompt_messages) > 0 and p.prompt_messages[-1]["role"] == "user" for p in pairs)
    # a few pairs (differing histories) carry more than one message on a side; most carry exactly one
    assert sum(len(p.chosen) > 1 or len(p.rejected) > 1 for p in pairs) <= 5
    # every side is a valid /score input for the server
    inputs = [side for p in pairs for side in (p.chosen_input(), p.rejected_input())]
    assert len(parse_inputs(inputs)) == 2 * len(pairs)
    # the plain renderer gives back the original dialogue exactly, except where odd whitespace was stripped
    with gzip.open(HH_TRAIN, "rt", encoding="utf-8") as f:
        raw = [json.loads(line) for line in f]
    same = sum(
        render_plain(p.chosen_input()["messages"]) == r["chosen"]
        and render_plain(p.rejected_input()["messages"]) == r["rejected"]
        for p, r in zip(pairs, raw)
    )
    assert same >= 1500


@pytest.mark.skipif(not HH_TRAIN.exists(), reason="shared HH data not present")
def test_hh_pairs_collate_exactly_as_the_server_encodes(tokenizer):
    pairs = load_preferences(HH_TRAIN)[:24]
    collator = PreferenceCollator(tokenizer, max_length=96)
    batch = collator(pairs)
    sides = [p.chosen_input() for p in pairs] + [p.rejected_input() for p in pairs]
    expected = [encode_input(tokenizer, s, 96) for s in sides]
    mismatched = sum(
        batch.input_ids[i, : len(e.input_ids)].tolist() != e.input_ids or int(batch.attention_mask[i].sum()) != e.tokens
        for i, e in enumerate(expected)
    )
    assert mismatched == 0
    assert batch.truncated.tolist() == [e.truncated for e in expected]
    assert 0 < int(batch.truncated.sum()) < 48  # some long dialogues were cut, some were not


# ---------------------------------------------------------------------------------------------- collator

PAIRS = [
    PreferencePair([user("Sky colour?")], [bot("Blue.")], [bot("Green, or maybe some purple on most days.")]),
    PreferencePair([user("Hi")], [bot("Hello! How can I help you today with anything at all?")], [bot("Go away.")]),
    PreferencePair([user("Count to two.")], [bot("One."), bot("Two.")], [bot("Three.")]),
]


@pytest.mark.parametrize("which", ["tokenizer", "chat_tokenizer"])
def test_collator_matches_encode_input_and_pads_right(request, which):
    tok = request.getfixturevalue(which)
    batch = PreferenceCollator(tok, max_length=512)(PAIRS)
    B = len(PAIRS)
    sides = [p.chosen_input() for p in PAIRS] + [p.rejected_input() for p in PAIRS]  # rows: chosen, then rejected
    expected = [encode_input(tok, s, 512) for s in sides]
    T = max(e.tokens for e in expected)
    assert batch.input_ids.shape == batch.attention_mask.shape == (2 * B, T)
    assert batch.num_pairs == B and batch.margin is None
    assert batch.input_ids.dtype == torch.long and batch.truncated.dtype == torch.bool
    for i, e in enumerate(expected):
        n = e.tokens
        assert batch.input_ids[i, :n].tolist() == e.input_ids
        assert batch.attention_mask[i].tolist() == [1] * n + [0] * (T - n)
        assert batch.input_ids[i, n:].tolist() == [tok.pad_token_id] * (T - n)
    assert not batch.truncated.any()


def test_collator_truncates_from_the_left(tokenizer):
    batch = PreferenceCollator(tokenizer, max_length=6)(PAIRS)
    full = [encode_input(tokenizer, p.chosen_input(), 10_000) for p in PAIRS]
    assert batch.input_ids.shape[1] == 6
    assert batch.truncated.tolist() == [e.tokens > 6 for e in full] + [
        encode_input(tokenizer, p.rejected_input(), 10_000).tokens > 6 for p in PAIRS
    ]
    for i, e in enumerate(full):
        if e.tokens > 6:  # [CLS] kept, then the last 5 ids (the end of the response, where the reward is read)
            assert batch.input_ids[i].tolist() == [tokenizer.cls_token_id] + e.input_ids[-5:]


def test_collator_margins_and_padding_multiple(tokenizer):
    with_margin = [PreferencePair(p.prompt_messages, p.chosen, p.rejected, float(i)) for i, p in enumerate(PAIRS)]
    batch = PreferenceCollator(tokenizer, max_length=512, pad_to_multiple_of=8)(with_margin)
    assert batch.margin.dtype == torch.float32 and batch.margin.tolist() == [0.0, 1.0, 2.0]
    assert batch.input_ids.shape[1] % 8 == 0
    with pytest.raises(ValueError, match="margin"):
        PreferenceCollator(tokenizer, max_length=512)([with_margin[0], PAIRS[1]])
    with pytest.raises(ValueError):
        PreferenceCollator(tokenizer, max_length=512)([])


def test_pad_right():
    ids, mask = pad_right([[5, 6, 7], [8]], pad_id=0, multiple_of=4)
    assert ids.tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert mask.tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]


def test_dataloader_batches_and_batched_rewards_equal_single_rewards(tokenizer):
    """Padding changes nothing: a reward read from the padded training batch equals the reward of that input alone."""
    from torch.utils.data import DataLoader
    from transformers import BertConfig, BertForSequenceClassification

    from rewardmodel.modeling import reward_forward

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=512, num_labels=1, pad_token_id=0,
    )
    model = BertForSequenceClassification(config).eval()
    loader = DataLoader(PAIRS, batch_size=2, collate_fn=PreferenceCollator(tokenizer, max_length=64))
    batches = list(loader)
    assert [type(b) for b in batches] == [PreferenceBatch, PreferenceBatch] and batches[0].num_pairs == 2
    batch = batches[0].to("cpu")
    with torch.no_grad():
        rewards = reward_forward(model, batch.input_ids, batch.attention_mask)  # (2B,)
        sides = [p.chosen_input() for p in PAIRS[:2]] + [p.rejected_input() for p in PAIRS[:2]]
        for i, side in enumerate(sides):
            ids = torch.tensor([encode_input(tokenizer, side, 64).input_ids])  # (1, T_i)
            alone = reward_forward(model, ids, torch.ones_like(ids))
            assert abs(alone.item() - rewards[i].item()) < 1e-5


# --------------------------------------------------------------------------- refused records, BOM, saved datasets


@pytest.mark.parametrize("margin", ["nan", float("nan"), float("inf"), "-inf", "1e999", True, [1.0]])
def test_a_margin_that_is_no_finite_number_is_refused(margin):
    with pytest.raises(ValueError, match="margin"):
        parse_record({"prompt": "q", "chosen": "a", "rejected": "b", "margin": margin})


def test_a_bare_json_nan_margin_is_refused_naming_its_record(tmp_path):
    path = tmp_path / "nan.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + '{"prompt": "q", "chosen": "a", "rejected": "b", "margin": NaN}\n')
    with pytest.raises(ValueError, match=r"nan.jsonl:2: preference record 2: margin must be a finite number, got nan$"):
        load_preferences(path)
    assert parse_record({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "0.5"}).margin == 0.5


def test_margins_on_some_records_only_are_refused_at_load_naming_the_first_that_differs():
    plain = [{k: v for k, v in r.items() if k != "margin"} for r in RECORDS]
    with pytest.raises(ValueError, match=r"record 2 has no margin but record 0 has one"):
        load_preferences([RECORDS[0], RECORDS[1], plain[0]])
    with pytest.raises(ValueError, match=r"record 0 has no margin but record 1 has one"):
        load_preferences([plain[0], RECORDS[1]])
    assert [p.margin for p in load_preferences(plain)] == [None, None]


@pytest.mark.parametrize("record, kind", [("a string", "a string"), (42, "a number"), (["a", "b"], "a list"),
                                          (None, "null")])
def test_a_record_that_is_no_json_object_says_so(record, kind):
    with pytest.raises(ValueError, match=rf"^preference record 1 is not a JSON object \(got {kind}\)$"):
        load_preferences([RECORDS[0], record])


def test_a_jsonl_file_whose_first_line_is_a_list_is_read_line_by_line(tmp_path):
    path = tmp_path / "first_line_list.jsonl"
    path.write_text('["a", "b"]\n' + json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(ValueError, match=r"first_line_list.jsonl:1: preference record 1 is not a JSON object \(got a list\)$"):
        load_preferences(path)
    (tmp_path / "broken.json").write_text('[{"chosen": "x",\n')
    with pytest.raises(ValueError, match=r"broken.json: not JSON"):
        read_records(tmp_path / "broken.json")


@pytest.mark.parametrize("kind", ["jsonl", "json", "jsonl.gz"])
def test_a_utf8_byte_order_mark_is_read_as_nothing(tmp_path, kind):
    plain = _write(tmp_path, kind)
    marked = tmp_path / f"bom.{kind}"
    if kind.endswith(".gz"):
        with gzip.open(plain, "rb") as f:
            body = f.read()
        with gzip.open(marked, "wb") as f:
            f.write(b"\xef\xbb\xbf" + body)
    else:
        marked.write_bytes(b"\xef\xbb\xbf" + plain.read_bytes())
    assert load_preferences(marked) == [parse_record(r) for r in RECORDS]


def test_a_folder_saved_by_datasets_is_a_data_source(tmp_path):
    from datasets import Dataset, DatasetDict

    Dataset.from_list(RECORDS).save_to_disk(str(tmp_path / "saved"))
    assert load_preferences(tmp_path / "saved") == [parse_record(r) for r in RECORDS]
    assert load_preferences(str(tmp_path / "saved")) == [parse_record(r) for r in RECORDS]
    DatasetDict({"train": Dataset.from_list(RECORDS)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"DatasetDict with splits \['train'\].*dict/train"):
        read_records(tmp_path / "dict")
    (tmp_path / "plain").mkdir()
    with pytest.raises(FileNotFoundError, match="no saved dataset"):
        read_records(tmp_path / "plain")


# ---------------------------------------------------------------------------------- unreadable files, positions


def test_a_file_named_gz_that_is_not_gzip_or_is_cut_short_is_refused_naming_it(tmp_path):
    plain = tmp_path / "plain.jsonl.gz"
    plain.write_text(json.dumps(RECORDS[0]) + "\n")
    with pytest.raises(ValueError, match=r"plain.jsonl.gz: not a readable gzip file \(Not a gzipped file"):
        read_records(plain)
    whole = _write(tmp_path, "jsonl.gz").read_bytes()
    cut = tmp_path / "cut.jsonl.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"cut.jsonl.gz: not a readable gzip file \(Compressed file ended"):
        read_records(cut)


def test_bytes_that_are_not_utf8_are_refused_naming_the_file_and_line(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes((json.dumps(RECORDS[0]) + "\n").encode() + '{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
                     .encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl:2: not UTF-8 text \(byte 0xe9\)"):
        read_records(path)


def test_an_upper_case_gz_suffix_is_read_as_gzip(tmp_path):
    path = _write(tmp_path, "jsonl.gz").rename(tmp_path / "PREFS.JSONL.GZ")
    assert load_preferences(path) == [parse_record(r) for r in RECORDS]


def test_a_bad_record_in_a_file_names_the_file_and_its_position_from_1(tmp_path):
    bad = {"chosen": "x"}
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:3: preference record 2: a preference record needs"):
        load_preferences(tmp_path / "bad.jsonl")  # its line (after a blank one) and its number
    (tmp_path / "bad.json").write_text(json.dumps([RECORDS[0], bad]))
    with pytest.raises(ValueError, match=r"bad.json: preference record 2: a preference record needs"):
        load_preferences(tmp_path / "bad.json")
    from datasets import Dataset

    Dataset.from_list([{"chosen": "x", "rejected": None}]).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(ValueError, match=r"saved: preference record 1: "):
        load_preferences(tmp_path / "saved")
    plain = {k: v for k, v in RECORDS[1].items() if k != "margin"}
    (tmp_path / "mixed.jsonl").write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(plain) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: preference record 2 has no margin but record 1 \(line 1\) "
                                         r"has one"):
        load_preferences(tmp_path / "mixed.jsonl")


def test_a_pretty_printed_json_object_is_named_as_such(tmp_path):
    (tmp_path / "wrapped.json").write_text(json.dumps({"data": RECORDS}, indent=2))
    with pytest.raises(ValueError, match=r"wrapped.json: a JSON object with keys \['data'\], expected a list of "
                                         r"records or JSON lines"):
        read_records(tmp_path / "wrapped.json")


def test_plain_text_sides_without_a_prompt_hint_at_adding_one():
    with pytest.raises(ValueError, match=r"add a 'prompt' field"):
        parse_record({"chosen": "What is 2 + 2? 4.", "rejected": "What is 2 + 2? 5."})


def test_pairs_whose_sides_are_equal_are_kept_with_a_counted_warning(tmp_path, caplog):
    same = {"prompt": "q", "chosen": "a", "rejected": "a"}
    path = tmp_path / "same.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [RECORDS[0], same | {"margin": 1}, same | {"margin": 2}]))
    with caplog.at_level("WARNING", logger="rewardserve.train.data"):
        assert len(load_preferences(path)) == 3
    assert f"{path}: 2 of 3 pairs have a chosen side identical to the rejected one" in caplog.text


def test_truncation_is_counted_and_pairs_made_identical_by_it_are_warned(tokenizer, caplog):
    tail = " the same long ending" * 20
    cut_same = PreferencePair([user("q")], [bot("yes" + tail)], [bot("no" + tail)])
    short = PreferencePair([user("q")], [bot("yes")], [bot("no")])
    collator = PreferenceCollator(tokenizer, 32)
    counts = collator.truncation([cut_same, short, short])
    assert (counts.pairs, counts.rows_truncated, counts.pairs_truncated, counts.pairs_made_identical) == (3, 2, 1, 1)
    with caplog.at_level("INFO", logger="rewardserve.train.data"):
        counts.report("data.jsonl", 32)
    assert "data.jsonl: 2 of 6 rows (1 of 3 pairs) cut to max_length 32" in caplog.text
    assert "data.jsonl: 1 of 3 pairs are identical after truncation to max_length 32" in caplog.text
