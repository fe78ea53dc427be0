"""A text far longer than the model's limit is tokenized from its head and its end only (rendering.encode_text):
the result must be exactly what tokenizing the whole text and cutting it gives, for any text (hypothesis), with
the real MiniLM (WordPiece, [CLS] ... [SEP]) and SmolLM2 (byte-level BPE, chat specials) tokenizers and a
byte-level BPE whose pre-tokenizer groups digits by three from a run's start (as Llama 3's and Qwen's do), where
a cut inside a digit run changes the groups after it and the whole text must be tokenized instead."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rewardmodel import rendering
from rewardmodel.modeling import minilm_path
from rewardmodel.rendering import encode_text

PIECES = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=8),
    st.sampled_from(["hello", " world", " ", "\n", "  ", "[CLS]", "[SEP]", "<|im_start|>", "<|im_end|>", "12345",
                     "3.14159", "don't", "ünïcödé", "日本語", "🙂"]),
)
RUNS = st.sampled_from(["1", "7", "a", " ", "\n", "ab", "9 "])
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def long_texts(draw):
    """A few thousand characters: a repeated random phrase, and maybe a long run of one character (a digit
    run, one giant word, whitespace) somewhere, possibly across where a tail would be cut."""
    phrase = "".join(draw(st.lists(PIECES, min_size=1, max_size=20)))
    text = phrase * (6000 // len(phrase) + 1)
    if draw(st.booleans()):
        run = draw(RUNS) * draw(st.integers(50, 5000))
        at = draw(st.integers(0, len(text)))
        text = text[:at] + run + text[at:]
    return draw(st.sampled_from(["", "<|im_start|>", "[CLS] ", "<|im_start|><|im_start|>"])) + text


def _digit_group_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}{1,3}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    corpus = ["hello world 1234567 111 11 111111 don't 3.14159 ünïcödé 日本語 🙂 aaaa     \n\n"] * 50
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module", params=["minilm", "smollm2", "digit-groups"])
def tok(request, smollm2_tokenizer_dir):
    if request.param == "digit-groups":
        return _digit_group_tokenizer()
    return AutoTokenizer.from_pretrained(str(minilm_path() if request.param == "minilm" else smollm2_tokenizer_dir))


def _whole(tok, text, limit, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(rendering, "TAIL_MIN_CHARS", 10**12)  # never from the tail: the reference
        return encode_text(tok, text, limit)


@SETTINGS
@given(text=long_texts(), limit=st.sampled_from([1, 2, 16, 48, 100]))
def test_tail_equals_the_whole_text_cut(tok, text, limit, monkeypatch):
    monkeypatch.setattr(rendering, "TAIL_MIN_CHARS", 0)
    assert len(text) > rendering.TAIL_CHARS_PER_TOKEN * limit  # the tail path is tried
    assert encode_text(tok, text, limit) == _whole(tok, text, limit, monkeypatch)


def test_a_long_text_is_not_tokenized_whole(tok, monkeypatch):
    """The point of it: a megabyte is not tokenized (no call sees more than the head or a tail), and it gives
    the whole text's cut."""
    seen = []
    real = rendering.token_ids

    def spy(tokenizer, text, *args, **kwargs):
        seen.append(len(text))
        return real(tokenizer, text, *args, **kwargs)

    text = "<|im_start|>user\n" + "Tell me about the weather in Paris, 2024. " * 25_000 + "<|im_end|>"
    expected = _whole(tok, text, 512, monkeypatch)
    monkeypatch.setattr(rendering, "token_ids", spy)
    assert encode_text(tok, text, 512) == expected and expected.truncated
    assert max(seen) < 100_000 < len(text)


def test_a_cut_inside_a_digit_run_falls_back_to_the_whole_text(monkeypatch):
    """Digits grouped by three from the run's start: every cut inside the run regroups it, the two cuts
    disagree, and the whole text is tokenized (the same ids as without the tail path)."""
    tok = _digit_group_tokenizer()
    text = "hello world " * 500 + "1" * 40_001
    calls = []
    real = rendering.token_ids
    monkeypatch.setattr(rendering, "token_ids", lambda t, s, *a, **k: calls.append(len(s)) or real(t, s, *a, **k))
    enc = encode_text(tok, text, 64)
    assert max(calls) == len(text)  # it did fall back
    monkeypatch.setattr(rendering, "token_ids", real)
    assert enc == _whole(tok, text, 64, monkeypatch)


def test_a_lone_surrogate_anywhere_is_refused_as_before(monkeypatch):
    tok = AutoTokenizer.from_pretrained(str(minilm_path()))
    text = "fine text " * 4000
    text = text[:20_000] + "\ud800" + text[20_000:]
    with pytest.raises(rendering.RenderError, match="not valid Unicode"):
        encode_text(tok, text, 128)
