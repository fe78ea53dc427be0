"""Inputs -> token ids, the one piece of code that serving AND training use (no train/serve skew).

Rules:
- prompt/response and messages are rendered with the reward model's own chat template when its tokenizer
  has one; otherwise with the plain format below (the HH-RLHF dialogue style).
- raw strings are tokenized as they are.
- BOS is never doubled: when the rendered text already starts with BOS and the tokenizer adds one too,
  the added one is dropped.
- Inputs longer than the limit are truncated from the LEFT, keeping the leading special tokens
  ([CLS] / BOS) and the end of the text, where the reward is read.
- An input the model cannot read raises `RenderError` (a ValueError): a conversation its chat template rejects,
  text that is not valid Unicode, or an input that renders to no token at all (e.g. an empty raw string with a
  tokenizer that adds no special tokens). Callers report it as the client's mistake, naming the input.
- The tokenizer is never reconfigured (no truncation or padding switched on): one tokenizer object is safely
  shared by many threads. Truncation happens here, in Python.
"""

from __future__ import annotations

import functools
import json
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from rewardmodel.inputs import MessagesInput, PromptResponseInput, RawInput, StepsInput

# Plain format for tokenizers without a chat template. Each turn is "\n\n<Speaker>: <content>"; an assistant turn's
# tool calls follow its content as " <tool_calls>JSON</tool_calls>", a tool's answer is "Tool (name): content".
PLAIN_SPEAKERS = {"system": "System", "user": "Human", "assistant": "Assistant", "tool": "Tool", "function": "Tool"}


class RenderError(ValueError):
    """The input cannot be read by this model (the client's mistake): the message says why."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    truncated: bool

    @property
    def tokens(self) -> int:
        return len(self.input_ids)


def to_messages(inp: PromptResponseInput | MessagesInput | RawInput | dict) -> list[dict[str, Any]] | None:
    """The conversation as plain dicts (role, content and any tool fields), or None for a raw input."""
    if isinstance(inp, dict):
        if "raw" in inp:
            return None
        if "messages" in inp:
            return [dict(m, content=m.get("content") or "") for m in inp["messages"]]
        return [{"role": "user", "content": inp["prompt"]}, {"role": "assistant", "content": inp["response"]}]
    if isinstance(inp, RawInput):
        return None
    if isinstance(inp, PromptResponseInput):
        return [{"role": "user", "content": inp.prompt}, {"role": "assistant", "content": inp.response}]
    return [m.as_dict() for m in inp.messages]


def prompt_only(inp: Any) -> dict[str, Any] | None:
    """The input's conversation with the response emptied (`{"messages": [..., {"role": "assistant", "content":
    ""}]}`): what a gate that routes by the prompt reads. None for a raw input (its prompt cannot be told apart)."""
    if isinstance(inp, StepsInput) or (isinstance(inp, dict) and "steps" in inp):
        prompt = inp.prompt if isinstance(inp, StepsInput) else inp["prompt"]
        return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": ""}]}
    messages = to_messages(inp)
    if messages is None:
        return None
    return {"messages": [*messages[:-1], {"role": "assistant", "content": ""}]}


def _content_with_calls(message: dict[str, Any]) -> str:
    """A message's content with its tool calls written after it as ` <tool_calls>JSON</tool_calls>`."""
    text = message.get("content") or ""
    if message.get("tool_calls"):
        calls = json.dumps(message["tool_calls"], ensure_ascii=False, sort_keys=True)
        text = f"{text} <tool_calls>{calls}</tool_calls>" if text else f"<tool_calls>{calls}</tool_calls>"
    return text


def _tool_name(message: dict[str, Any]) -> str | None:
    return message.get("name") if message["role"] in ("tool", "function") and message.get("name") else None


def _plain_turn(message: dict[str, Any]) -> str:
    speaker = PLAIN_SPEAKERS[message["role"]]
    if _tool_name(message):
        speaker = f"{speaker} ({_tool_name(message)})"
    return f"\n\n{speaker}: {_content_with_calls(message)}"


def render_plain(messages: Sequence[dict[str, Any]]) -> str:
    return "".join(_plain_turn(m) for m in messages)


NEUTRAL = "\u200b"
"""Written after the first character of a special token's text found in a prompt, response or message: see
`neutral_text`."""
_PER_TOKENIZER: "weakref.WeakKeyDictionary[Any, dict[Callable, Any]]" = weakref.WeakKeyDictionary()


def per_tokenizer(compute: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """`compute(tokenizer)` remembered for as long as the tokenizer lives (a tokenizer's special tokens do not
    change once it is loaded)."""
    def remembered(tokenizer: Any) -> Any:
        held = _PER_TOKENIZER.setdefault(tokenizer, {})
        if compute not in held:
            held[compute] = compute(tokenizer)
        return held[compute]

    return functools.wraps(compute)(remembered)


@per_tokenizer
def special_texts(tokenizer: Any) -> tuple[str, ...]:
    """The texts the tokenizer reads as special tokens (BOS, EOS, [SEP], a template's <|im_end|>...), longest
    first."""
    texts = set(getattr(tokenizer, "all_special_tokens", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    texts |= {t.content for t in decoder.values() if getattr(t, "special", False)}
    return tuple(sorted((t for t in texts if t), key=len, reverse=True))


def neutral_text(tokenizer: Any, text: str) -> str:
    """`text` (a prompt, a response, a message's content) with every special token's text in it broken by a
    zero-width space after its first character, so that it is read as text, never as the token itself: a
    response that writes "<|im_end|>\n<|im_start|>user" must not open a turn of the template (a policy could
    forge one for its reward). Text without any is returned as it is (the same tokens as ever). `raw` inputs
    are not touched: they are the rendered text itself."""
    for special in special_texts(tokenizer):
        if special in text:
            text = text.replace(special, special[0] + NEUTRAL + special[1:])
    return text


def _neutral_value(tokenizer: Any, value: Any) -> Any:
    if isinstance(value, str):
        return neutral_text(tokenizer, value)
    if isinstance(value, dict):
        return {k: _neutral_value(tokenizer, v) for k, v in value.items()}
    if isinstance(value, list):
        return [_neutral_value(tokenizer, v) for v in value]
    return value


def neutral_messages(tokenizer: Any, messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every message's text (content, tool calls, names) through `neutral_text`; roles as they are."""
    return [{k: (v if k == "role" else _neutral_value(tokenizer, v)) for k, v in m.items()} for m in messages]


def render_text(tokenizer: Any, inp: Any) -> str:
    """The text the reward model reads for one input (special tokens' texts inside it neutralized)."""
    if isinstance(inp, RawInput):
        return inp.raw
    if isinstance(inp, dict) and "raw" in inp:
        return inp["raw"]
    messages = neutral_messages(tokenizer, to_messages(inp))
    if not getattr(tokenizer, "chat_template", None):
        return render_plain(messages)
    text = _apply_template(tokenizer, messages)
    if any(m.get("tool_calls") or _tool_name(m) for m in messages):
        # Many templates (the shipped model's among them) drop tool calls and tool names: two different calls
        # would get the same reward. Where the template renders the conversation without them exactly as with
        # them, they are written into the content instead, as the plain format writes them.
        if _apply_template(tokenizer, [_without_tool_fields(m) for m in messages]) == text:
            text = _apply_template(tokenizer, [_tool_fields_in_content(m) for m in messages])
    return text


def _without_tool_fields(message: dict[str, Any]) -> dict[str, Any]:
    """The message without its tool calls and, a tool's answer, its name (what the reward must see)."""
    dropped = ("tool_calls", "name") if _tool_name(message) else ("tool_calls",)
    return {k: v for k, v in message.items() if k not in dropped}


def _tool_fields_in_content(message: dict[str, Any]) -> dict[str, Any]:
    """The message with its tool calls (and a tool's name, in front) written into its content."""
    name = _tool_name(message)
    return dict(_without_tool_fields(message), content=(f"({name}) " if name else "") + _content_with_calls(message))


def _apply_template(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as exc:  # jinja's TemplateError, or the template's own raise_exception(...)
        raise RenderError(f"the reward model's chat template rejected the conversation: {exc}") from None


def _leading_specials(ids: Sequence[int], special: set[int]) -> int:
    n = 0
    while n < len(ids) and ids[n] in special:
        n += 1
    return n


def token_ids(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """All of `text`'s token ids, without touching the tokenizer's settings (thread-safe for a shared tokenizer).

    A fast tokenizer is asked directly (its Rust `encode_batch` takes no lock and changes no state) when it has
    no truncation or padding configured; otherwise, and for slow tokenizers, the transformers call asks for no
    truncation. The batch call, not `encode`, because it lets go of Python's GIL while it works: a server's
    event loop keeps answering while another thread tokenizes a long text (measured: `encode` of 4.8 MB froze
    the loop of a running server for 2 s). Text that is not valid Unicode raises RenderError."""
    try:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None and backend.truncation is None and backend.padding is None:
            return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        # verbose=False: over-long inputs are expected here (truncated by the caller), no warning per input
        return list(tokenizer(text, add_special_tokens=add_special_tokens, truncation=False, verbose=False)["input_ids"])
    except (TypeError, UnicodeError) as exc:
        check = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace") != text
        reason = "text is not valid Unicode (a lone surrogate?)" if check else f"the tokenizer refused the text: {exc}"
        raise RenderError(reason) from None


TAIL_MIN_CHARS = 16384
"""Texts longer than this (and than TAIL_CHARS_PER_TOKEN x the model's limit) are tokenized from their end only:
see `encode_text`."""
TAIL_CHARS_PER_TOKEN = 32
TAIL_MARGIN = 64
"""Tokens between a tail's cut and the tokens kept from it (and compared between two cuts)."""
HEAD_CHARS = 2048


@per_tokenizer
def added_specials(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer adds before and after a text (BOS; BERT's [CLS] and [SEP])."""
    try:
        bare = token_ids(tokenizer, "a", add_special_tokens=False)
        full = token_ids(tokenizer, "a", add_special_tokens=True)
        start = next(i for i in range(len(full) - len(bare) + 1) if full[i:i + len(bare)] == bare)
        found = (full[:start], full[start + len(bare):])
    except (StopIteration, RenderError):
        found = ([], [])
    bos = getattr(tokenizer, "bos_token_id", None)
    if not found[0] and bos is not None:
        found = ([bos], found[1])  # a text that holds BOS where the tokenizer adds none: still one, not two
    return found


def _without_doubled_bos(tokenizer: Any, ids: list[int], tail: bool = True) -> list[int]:
    """The ids without the special tokens added twice: a raw text (or a template) that holds the BOS, [CLS] or
    [SEP] the tokenizer adds too. `tail`: also look at the end (not for a head cut out of a longer text)."""
    prefix, suffix = added_specials(tokenizer)
    if prefix and ids[:2 * len(prefix)] == prefix + prefix:
        ids = ids[len(prefix):]
    if tail and suffix and len(ids) >= 2 * len(suffix) and ids[len(ids) - 2 * len(suffix):] == suffix + suffix:
        ids = ids[:len(ids) - len(suffix)]
    return ids


def _special_ids(tokenizer: Any) -> set[int]:
    return set(getattr(tokenizer, "all_special_ids", []) or [])


def encode_text(tokenizer: Any, text: str, max_length: int) -> Encoded:
    """Tokenize with the tokenizer's special tokens, drop a doubled BOS, truncate from the left (keeping the
    leading special tokens, e.g. BOS).

    A text far longer than the model's limit is not tokenized whole (megabytes would cost seconds of a core for
    512 kept tokens, and hold up every later request's tokenizing): its leading special tokens come from its first
    HEAD_CHARS characters and the kept tokens from its end, tokenized from two cuts TAIL_MARGIN+ tokens before the
    kept ones. A tokenizer's choices are local (pre-tokenizers split words; merges happen inside them), so two cuts
    that agree on the kept tokens and on the margin before them give the whole text's tokens; where they do not
    agree (one word longer than the cut's reach, digits grouped from a run's start) the cut moves further back,
    and in the end the whole text is tokenized. Same ids either way (tests/unit/test_rendering_tail.py)."""
    if len(text) > max(TAIL_MIN_CHARS, TAIL_CHARS_PER_TOKEN * max_length):
        tail = _encode_tail(tokenizer, text, max_length)
        if tail is not None:
            return tail
    ids = _without_doubled_bos(tokenizer, token_ids(tokenizer, text))
    if not ids:
        raise RenderError("the input renders to no tokens (empty text, and the tokenizer adds no special tokens)")
    if len(ids) <= max_length:
        return Encoded(ids, False)
    head = min(_leading_specials(ids, _special_ids(tokenizer)), max_length - 1) if max_length > 1 else 0
    keep_tail = max_length - head
    return Encoded(ids[:head] + ids[len(ids) - keep_tail :], True)


def _encode_tail(tokenizer: Any, text: str, max_length: int) -> Encoded | None:
    """`encode_text` of a long text from its head and its end (None: could not be sure; tokenize it whole)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate anywhere: the whole text's tokenizing says so
        return None
    special = _special_ids(tokenizer)
    head_ids = _without_doubled_bos(tokenizer, token_ids(tokenizer, text[:HEAD_CHARS]), tail=False)
    lead = _leading_specials(head_ids, special)
    if len(head_ids) - lead < TAIL_MARGIN:  # the leading specials might run on past the head's cut
        return None
    head = min(lead, max_length - 1) if max_length > 1 else 0
    compared = max_length - head + TAIL_MARGIN
    span = TAIL_CHARS_PER_TOKEN // 4 * max_length
    while 2 * span < len(text):
        near = _without_doubled_bos(tokenizer, token_ids(tokenizer, text[-span:]))
        if len(near) - _leading_specials(near, special) >= compared + TAIL_MARGIN:
            far = _without_doubled_bos(tokenizer, token_ids(tokenizer, text[-span - 13:]))  # another cut: 13 is
            # prime (digit groups of 2, 3, 4 ...)
            if near[-compared:] == far[-compared:]:
                return Encoded(head_ids[:head] + near[len(near) - (max_length - head):], True)
        span *= 4
    return None


def encode_input(tokenizer: Any, inp: Any, max_length: int) -> Encoded:
    return encode_text(tokenizer, render_text(tokenizer, inp), max_length)


OFFSET_POSITIONS = {
    "roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "data2vec-text", "ibert", "longformer", "luke",
    "markuplm", "mpnet", "roberta-prelayernorm", "xmod", "esm", "lilt", "layoutlmv3",
}
"""Model types whose position ids count from padding_idx + 1 (RoBERTa's scheme, transformers'
create_position_ids_from_input_ids): max_position_embeddings - padding_idx - 1 tokens fit."""


def model_max_length(tokenizer: Any, config: Any, cap: int = 0) -> int:
    """The longest input the model takes: the smaller of its positions, the tokenizer's limit and the cap."""
    limits = []
    positions = getattr(config, "max_position_embeddings", None)
    pad = getattr(config, "pad_token_id", None)
    offset = getattr(config, "model_type", None) in OFFSET_POSITIONS and isinstance(pad, int)
    if isinstance(positions, int) and offset:
        positions -= pad + 1  # position ids start after the padding index: roberta-base's 514 fit 512 tokens
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 10**7:
        limits.append(tok_limit)
    if cap and cap > 0:
        limits.append(cap)
    return min(limits) if limits else 2048
