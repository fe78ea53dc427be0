"""vLLM's pooling and tokenizer APIs as vLLM 0.32 defines them (vllm/entrypoints/pooling/{base,classify,pooling}/
protocol.py, vllm/entrypoints/serve/tokenize/protocol.py): request and response models, the classifier activation
it reads from the checkpoint, and its tokenization (vllm/renderers/params.py TokenizeParams) as an engine encoder.

The tokenization follows vLLM, not rewardserve's left truncation, so that the same request scores the same on both
servers; it never reconfigures the shared tokenizer (a private clone does the tokenizer-side truncation).
"""

from __future__ import annotations

import base64
import math
import threading
from typing import Any, Callable, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from rewardmodel.inputs import Text
from rewardmodel.rendering import Encoded, RenderError, token_ids
from service.errors import invalid


# ---- pooling ---------------------------------------------------------------------------------------------
class CompatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Text
    content: Text | list[dict[str, Any]] | None = None


class PoolingRequest(BaseModel):
    """The fields of vLLM's Classification*/Pooling*Request that matter here; other fields are ignored,
    as vLLM ignores unknown ones."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: list[int] | list[list[int]] | Text | list[Text] | None = None
    messages: list[CompatMessage] | None = None
    use_activation: bool | None = Field(default=None, description="Sigmoid on the logit (default true).")
    activation: bool | None = Field(default=None, description="Older spelling of use_activation.")
    softmax: bool | None = Field(default=None, description="Older spelling of use_activation.")
    normalize: bool | None = Field(default=None, description="Older spelling of use_activation.")
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    truncation_side: Literal["left", "right"] | None = None
    add_special_tokens: bool | None = Field(default=None, description="Default true for input, false for messages.")
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    request_id: str | None = None
    task: str | None = None
    dimensions: int | None = None
    encoding_format: Literal["float", "base64"] = "float"
    embed_dtype: Literal["float32", "float16"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"

    @model_validator(mode="after")
    def _one_form(self) -> "PoolingRequest":
        if self.input is None and self.messages is None:
            raise ValueError("send `input` (text or token ids) or `messages` (a chat)")
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self

    def wants_activation(self) -> bool:
        for value in (self.use_activation, self.activation, self.softmax, self.normalize):
            if value is not None:
                return value
        return True  # vLLM's PoolingParams default for classify


class ClassificationData(BaseModel):
    index: int
    label: str | None
    probs: list[float]
    num_classes: int


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    total_tokens: int = 0
    completion_tokens: int | None = 0
    prompt_tokens_details: dict[str, Any] | None = None
    completion_tokens_details: dict[str, Any] | None = None


class ClassificationResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[ClassificationData]
    usage: UsageInfo


class PoolingResponseData(BaseModel):
    index: int
    object: str = "pooling"
    data: list[float] | list[list[float]] | str


class PoolingResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ModelInfo:
    """What vLLM reads from the checkpoint's config: labels, the classifier activation, the vocabulary."""

    def __init__(self, backend: Any, tokenizer: Any):
        config = getattr(getattr(backend, "model", None), "config", None)
        if config is None and getattr(backend, "source", None) is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(backend.source.path))
        self.id2label: dict[int, str] = dict(getattr(config, "id2label", None) or {})
        vocab = getattr(config, "vocab_size", None) or len(tokenizer)
        self.vocab_size = int(vocab)  # ids index the embedding: the model's size bounds them
        self.activation = classifier_activation(config)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def classifier_activation(config: Any) -> Callable[[float], float]:
    """vLLM's get_act_fn (model_executor/layers/pooler/activations.py) for a one-label head: regression ->
    identity; otherwise sigmoid (softmax over one label is sigmoid there), unless the checkpoint names an
    activation (sentence-transformers `activation_fn`) other than Sigmoid/Softmax."""
    problem = getattr(config, "problem_type", None)
    if problem == "regression":
        return lambda x: x
    name = (getattr(config, "sentence_transformers", None) or {}).get("activation_fn") or getattr(
        config, "sbert_ce_default_activation_function", None
    )
    if problem is None and name:
        short = name.rsplit(".", 1)[-1]
        if short == "Identity":
            return lambda x: x
        if short not in ("Sigmoid", "Softmax"):
            import torch

            if (cls := getattr(torch.nn, short, None)) is not None:  # vLLM refuses to load names it cannot find
                module = cls()
                return lambda x: float(module(torch.tensor([x], dtype=torch.float32))[0])
    return _sigmoid


# ---- vLLM-style rendering and tokenization ---------------------------------------------------------------
def _text_content(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise invalid(f"only text content parts are supported, got type {part.get('type')!r}")
        texts.append(part["text"])
    return "\n".join(texts)  # vLLM's 'string' content format joins text parts with newlines


def render_chat(tokenizer: Any, body: PoolingRequest | TokenizeRequest) -> str:
    if body.chat_template is not None or (body.chat_template_kwargs or {}).get("chat_template") is not None:
        raise invalid("Chat template is passed with request, but this server does not accept request chat templates.")
    if not getattr(tokenizer, "chat_template", None):
        raise invalid("the model's tokenizer has no chat template: send `input` text instead of `messages`")
    conversation = [
        {**(m.model_extra or {}), "role": m.role, "content": _text_content(m.content)} for m in body.messages or []
    ]
    kwargs = {**(body.chat_template_kwargs or {}), "add_generation_prompt": body.add_generation_prompt,
              "continue_final_message": body.continue_final_message}
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, **kwargs)
    except Exception as exc:  # the template rejected the conversation: the caller's error, as in vLLM
        raise RenderError(f"the chat template rejected the messages: {exc}") from None


def inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its `$defs` references inlined: inside the OpenAPI document a
    `#/$defs/...` reference would point at the document's root, where nothing is (no recursive models here)."""
    defs = schema.pop("$defs", {})

    def inline(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                return inline(defs[ref.removeprefix("#/$defs/")])
            return {key: inline(value) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(value) for value in node]
        return node

    return inline(schema)


# ---- tokenizer API ----------------------------------------------------------------------------------------
class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`), in one model."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    prompt: Text | None = None
    messages: list[CompatMessage] | None = None
    add_special_tokens: bool | None = Field(default=None, description="Default true for prompt, false for messages.")
    add_generation_prompt: bool = Field(default=True, description="Chat form: add the generation prompt.")
    continue_final_message: bool = False
    return_token_strs: bool | None = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("send `prompt` (text) or `messages` (a chat)")
        if self.continue_final_message and self.add_generation_prompt and self.messages is not None:
            raise ValueError("Cannot set both `continue_final_message` and `add_generation_prompt` to True.")
        return self


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[int] = Field(description="Token ids to turn back into text.")


class DetokenizeResponse(BaseModel):
    prompt: str


# ---- vLLM's tokenization, as an engine encoder -----------------------------------------------------------
class TruncatingTokenizer:
    """vLLM truncates on the tokenizer side (`truncation=True, max_length=keep`, from the tokenizer's truncation
    side, the special tokens kept). That needs a tokenizer configured for truncation, which the shared tokenizer
    must never be: this is a private clone of its fast backend, used under a lock."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.side = getattr(tokenizer, "truncation_side", "right")
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._clone = None
        if backend is not None:
            from tokenizers import Tokenizer

            self._clone = Tokenizer.from_str(backend.to_str())
            self._clone.no_padding()
        self._lock = threading.Lock()

    def encode(self, text: str, add_special_tokens: bool, keep: int) -> list[int]:
        with self._lock:
            if self._clone is None:  # a slow tokenizer: its own call, serialized (it keeps no truncation state)
                return list(self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                                           max_length=keep)["input_ids"])
            self._clone.enable_truncation(max_length=keep, direction=self.side)
            return self._clone.encode(text, add_special_tokens=add_special_tokens).ids


class ChatPrompt:
    """A pooling request's `messages`, rendered with the model's chat template when encoded."""

    def __init__(self, body: "PoolingRequest"):
        self.body = body


class VllmEncoder:
    """Encodes a pooling request's prompts (text, token ids, or its chat) as vLLM does: keep
    `truncate_prompt_tokens` tokens (-1: the model's length) from the tokenizer's truncation side unless
    `truncation_side` says; longer than the model takes is an error, as is an empty prompt."""

    def __init__(self, tokenizer: Any, truncating: TruncatingTokenizer, max_length: int, vocab_size: int,
                 body: "PoolingRequest"):
        self.tokenizer = tokenizer
        self.truncating = truncating
        self.max_length = max_length
        self.vocab_size = vocab_size
        keep = body.truncate_prompt_tokens
        if keep is not None and keep > max_length:
            raise invalid(
                "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size."
            )
        self.keep = max_length if keep == -1 else keep
        self.side = body.truncation_side
        # vLLM: special tokens by default for text input, not for chat (the template brings its own)
        self.text_specials = body.add_special_tokens is not False
        self.chat_specials = bool(body.add_special_tokens)

    def __call__(self, prompt: Any) -> Encoded:
        if isinstance(prompt, ChatPrompt):
            return self.text(render_chat(self.tokenizer, prompt.body), self.chat_specials)
        if isinstance(prompt, str):
            return self.text(prompt, self.text_specials)
        return self.token_ids(list(prompt))

    def text(self, text: str, add_special_tokens: bool) -> Encoded:
        ids = token_ids(self.tokenizer, text, add_special_tokens)
        if self.keep is not None and self.side is None and len(ids) > self.keep:  # the tokenizer truncates
            return Encoded(self.check(self.truncating.encode(text, add_special_tokens, self.keep))[0], True)
        return Encoded(*self.check(ids))

    def token_ids(self, ids: list[int]) -> Encoded:
        ids, truncated = self.check(ids)
        low, high = min(ids), max(ids)
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise invalid(f"Token id {bad} is out of vocabulary (ids must be in [0, {self.vocab_size}))")
        return Encoded(ids, truncated)

    def check(self, ids: list[int]) -> tuple[list[int], bool]:
        truncated = False
        if self.keep is not None and len(ids) > self.keep:
            side = self.side or self.truncating.side
            ids = ids[len(ids) - self.keep :] if side == "left" else ids[: self.keep]
            truncated = True
        if not ids:
            raise RenderError("The prompt cannot be empty")
        if len(ids) > self.max_length:
            raise invalid(
                f"This model's maximum context length is {self.max_length} tokens. However, your prompt contains "
                f"{len(ids)} input tokens. Please reduce the length of the input prompt or set truncate_prompt_tokens."
            )
        return ids, truncated


def prompts_of(body: PoolingRequest) -> list:
    """`input` as a list of prompts (vLLM's prompt_to_seq): a string or one id list is one prompt."""
    raw = body.input
    return [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw or [])


def usage_of(token_counts: list[int]) -> UsageInfo:
    tokens = sum(token_counts)
    return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)


def encode_floats(values: list[float], body: PoolingRequest) -> list[float] | str:
    if body.encoding_format == "float":
        return values
    order = {"native": "=", "big": ">", "little": "<"}[body.endianness]
    dtype = np.dtype(("f4" if body.embed_dtype == "float32" else "f2")).newbyteorder(order)
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")
