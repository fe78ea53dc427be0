"""Properties of rendering and truncation (hypothesis), with the real MiniLM (plain format, [CLS] ... [SEP]) and
SmolLM2 (chat template, BOS-less) tokenizers.

For any text and any limit: the result fits the limit; it is cut exactly when the full encoding is longer; a cut
keeps the leading special tokens and the END of the full encoding (where the reward is read); a result that
was not cut is the full encoding; BOS is never doubled. For any conversation: a prompt/response pair renders as
the two messages it stands for, and the rendered text ends with the scored response.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from transformers import AutoTokenizer

from rewardmodel.modeling import minilm_path
from rewardmodel.rendering import RenderError, encode_input, encode_text, neutral_text, render_text, token_ids
from service.schemas import MessagesInput, PromptResponseInput, RawInput

UNLIMITED = 10**9
# Words, punctuation, whitespace, non-Latin scripts, emoji, and the tokenizers' own special-token strings.
PIECES = st.one_of(
    st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=6),
    st.sampled_from(["hello", " world", " ", "\n", "[CLS]", "[SEP]", "<|im_start|>", "<|im_end|>", "<|endoftext|>"]),
)
TEXT = st.lists(PIECES, max_size=12).map("".join)
LIMIT = st.integers(min_value=1, max_value=48)
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["minilm", "smollm2"])
def tok(request, smollm2_tokenizer_dir):
    path = minilm_path() if request.param == "minilm" else smollm2_tokenizer_dir
    return AutoTokenizer.from_pretrained(str(path))


def _special(tok) -> set[int]:
    return set(tok.all_special_ids)


@SETTINGS
@given(text=TEXT, limit=LIMIT)
def test_truncation_fits_and_keeps_the_end(tok, text, limit):
    if not token_ids(tok, text):  # nothing to read (e.g. "" with a tokenizer that adds no specials): refused
        with pytest.raises(RenderError, match="no tokens"):
            encode_text(tok, text, limit)
        return
    full = encode_text(tok, text, UNLIMITED)
    assert not full.truncated
    enc = encode_text(tok, text, limit)
    assert enc.tokens <= limit
    assert enc.truncated == (full.tokens > limit)
    if not enc.truncated:
        assert enc.input_ids == full.input_ids
        return
    assert enc.tokens == limit  # a cut fills the limit exactly
    lead = 0
    while lead < full.tokens and full.input_ids[lead] in _special(tok):
        lead += 1
    head = min(lead, limit - 1)
    assert enc.input_ids[:head] == full.input_ids[:head]  # leading [CLS] / BOS kept
    tail = limit - head
    assert enc.input_ids[head:] == full.input_ids[-tail:]  # the end (the scored token) kept
    assert enc.input_ids[-1] == full.input_ids[-1]


@SETTINGS
@given(text=TEXT, limit=st.integers(min_value=2, max_value=48))  # a limit of 1 keeps only the last token
def test_bos_is_never_doubled(smollm2_tokenizer_dir, text, limit):
    tok = _bos_tokenizer(smollm2_tokenizer_dir)  # a tokenizer that adds BOS itself
    bos = tok.bos_token_id
    assume(tok(text, add_special_tokens=False)["input_ids"][:1] != [bos])  # a text of its own BOS stays as sent
    # the text with one BOS in front encodes like the text alone: one BOS, the tokenizer's or the text's
    assert encode_text(tok, tok.bos_token + text, limit) == encode_text(tok, text, limit)
    ids = encode_text(tok, tok.bos_token + text, UNLIMITED).input_ids  # (a cut keeps [BOS] + the text's end)
    assert ids[0] == bos and ids[1:2] != [bos]


_BOS_TOKENIZERS: dict = {}


def _bos_tokenizer(path):
    if path not in _BOS_TOKENIZERS:
        _BOS_TOKENIZERS[path] = AutoTokenizer.from_pretrained(str(path), add_bos_token=True)
    return _BOS_TOKENIZERS[path]


ROLE_TURN = st.tuples(st.sampled_from(["system", "user", "assistant"]), TEXT)


@SETTINGS
@given(prompt=TEXT, response=TEXT, limit=LIMIT)
def test_pair_equals_its_two_messages(tok, prompt, response, limit):
    pair = PromptResponseInput(prompt=prompt, response=response)
    msgs = MessagesInput(messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
    assert render_text(tok, pair) == render_text(tok, msgs)
    assert encode_input(tok, pair, limit) == encode_input(tok, msgs, limit)


@SETTINGS
@given(turns=st.lists(ROLE_TURN, max_size=4), response=TEXT, limit=LIMIT)
def test_conversations_render_ending_with_the_response(tok, turns, response, limit):
    messages = [{"role": r, "content": c} for r, c in turns] + [{"role": "assistant", "content": response}]
    inp = MessagesInput(messages=messages)
    text = render_text(tok, inp)
    response = neutral_text(tok, response)  # a special token's text in it is read as text (rendering.py)
    if getattr(tok, "chat_template", None):
        assert text.endswith(f"<|im_start|>assistant\n{response}<|im_end|>\n")
    else:
        assert text.endswith(f"\n\nAssistant: {response}")
    enc = encode_input(tok, inp, limit)
    assert 0 < enc.tokens <= limit
    assert encode_input(tok, inp, limit) == enc  # deterministic


@SETTINGS
@given(text=TEXT, limit=LIMIT)
def test_raw_is_the_text_as_is(tok, text, limit):
    assert render_text(tok, RawInput(raw=text)) == text
    if token_ids(tok, text):
        assert encode_input(tok, RawInput(raw=text), limit) == encode_text(tok, text, limit)
