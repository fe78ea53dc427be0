"""Compatibility routes: OpenRLHF's remote RM protocol and vLLM's pooling API, on the same engine.

Transport only: decode -> token ids -> `engine.score` / `engine.score_ids` (same batcher) -> encode.

- `POST /get_reward` (OpenRLHF): `{"query": [...], "prompts": [...], "labels": [...]}` ->
  `{"rewards": [...], "scores": [...], "extra_logs": {}}`; each query is already-templated text, scored raw.
- `POST /classify`, `POST /pooling` (vLLM 0.32): request and response shapes as vLLM's
  (vllm/entrypoints/pooling/{base,classify,pooling}/protocol.py); text is tokenized the way vLLM's renderer
  does (vllm/renderers/params.py TokenizeParams), not with rewardserve's left truncation, so that the same
  request scores the same on both servers. Request errors are 400, as vLLM answers them, in our error format.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
import uuid
from typing import Any, Callable, Literal

import numpy as np
from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from service import metrics
from service.engine import TOKENIZE_INLINE_MAX, RewardEngine, ScoreOutcome
from service.errors import ErrorKind, RewardServeError, invalid
from service.http_api.common import (
    ERROR_RESPONSES, TIMEOUT_HEADER, parse_timeout_header, run_unless_disconnected, timing_headers,
)
from service.schemas import describe_validation_error


# ---- OpenRLHF ------------------------------------------------------------------------------------------
class RewardRequest(BaseModel):
    """What OpenRLHF's remote RM client POSTs (openrlhf/utils/agent.py, _fetch_rewards_via_http);
    older clients (openrlhf/utils/remote_rm_utils.py, remote_rm_fn) send `query` alone."""

    model_config = ConfigDict(extra="ignore")

    query: list[str] = Field(description="Prompt + response, already templated by the policy; scored as raw text.")
    prompts: list[str] | None = Field(default=None, description="The prompts alone (accepted, not used).")
    labels: list[Any] | None = Field(default=None, description="Reference labels (accepted, not used).")

    @model_validator(mode="after")
    def _same_lengths(self) -> "RewardRequest":
        for name in ("prompts", "labels"):
            value = getattr(self, name)
            if value is not None and len(value) != len(self.query):
                raise ValueError(f"{name} has {len(value)} entries but query has {len(self.query)}")
        return self


class RewardResponse(BaseModel):
    rewards: list[float] = Field(description="Raw rewards (logits), in query order.")
    scores: list[float] = Field(description="The same values (OpenRLHF logs them as scores).")
    extra_logs: dict[str, Any] = Field(default_factory=dict)


# ---- vLLM pooling API -----------------------------------------------------------------------------------
class CompatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class PoolingRequest(BaseModel):
    """The fields of vLLM's Classification*/Pooling*Request that matter here; other fields are ignored,
    as vLLM ignores unknown ones."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: list[int] | list[list[int]] | str | list[str] | None = None
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
    data: list[float] | str


class PoolingResponse(BaseModel):
    id: str
    object: str = "list"
    created: int
    model: str
    data: list[PoolingResponseData]
    usage: UsageInfo


class ModelInfo:
    """What vLLM reads from the checkpoint's config: labels, the classifier activation, the vocabulary."""

    def __init__(self, engine: RewardEngine):
        config = getattr(getattr(engine.backend, "model", None), "config", None)
        if config is None and getattr(engine.backend, "source", None) is not None:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(engine.backend.source.path))
        self.id2label: dict[int, str] = dict(getattr(config, "id2label", None) or {})
        vocab = getattr(config, "vocab_size", None) or len(engine.tokenizer)
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


def render_chat(tokenizer: Any, body: PoolingRequest) -> str:
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
        raise invalid(f"the chat template rejected the messages: {exc}") from None


class Tokenization:
    """vLLM's TokenizeParams for a pooling request: keep `truncate_prompt_tokens` tokens (-1: the model's
    length) from the tokenizer's truncation side unless `truncation_side` says; longer inputs are an error."""

    def __init__(self, engine: RewardEngine, body: PoolingRequest, add_special_tokens: bool):
        self.tokenizer = engine.tokenizer
        self.max_length = engine.max_length
        self.add_special_tokens = add_special_tokens
        keep = body.truncate_prompt_tokens
        if keep is not None and keep > self.max_length:
            raise invalid(
                "truncate_prompt_tokens value is greater than max_model_len. Please request a smaller truncation size."
            )
        self.keep = self.max_length if keep == -1 else keep
        self.side = body.truncation_side

    def text(self, text: str) -> tuple[list[int], bool]:
        tok = self.tokenizer
        ids = list(tok(text, add_special_tokens=self.add_special_tokens, truncation=False, verbose=False)["input_ids"])
        if self.keep is not None and self.side is None and len(ids) > self.keep:  # the tokenizer truncates
            ids = list(tok(text, add_special_tokens=self.add_special_tokens, truncation=True, max_length=self.keep)[
                "input_ids"
            ])
            return self.check(ids)[0], True
        return self.check(ids)

    def token_ids(self, ids: list[int], vocab_size: int) -> tuple[list[int], bool]:
        ids, truncated = self.check(list(ids))
        low, high = min(ids), max(ids)
        if low < 0 or high >= vocab_size:
            bad = low if low < 0 else high
            raise invalid(f"Token id {bad} is out of vocabulary (ids must be in [0, {vocab_size}))")
        return ids, truncated

    def check(self, ids: list[int]) -> tuple[list[int], bool]:
        truncated = False
        if self.keep is not None and len(ids) > self.keep:
            side = self.side or getattr(self.tokenizer, "truncation_side", "right")
            ids = ids[len(ids) - self.keep :] if side == "left" else ids[: self.keep]
            truncated = True
        if not ids:
            raise invalid("The prompt cannot be empty")
        if len(ids) > self.max_length:
            raise invalid(
                f"This model's maximum context length is {self.max_length} tokens. However, your prompt contains "
                f"{len(ids)} input tokens. Please reduce the length of the input prompt or set truncate_prompt_tokens."
            )
        return ids, truncated


def encode_pooling_request(engine: RewardEngine, info: ModelInfo, body: PoolingRequest) -> tuple[list, int]:
    """Token ids per prompt, and how many were truncated."""
    if body.messages is not None:  # vLLM takes the chat form when messages are present
        tok = Tokenization(engine, body, bool(body.add_special_tokens))
        encoded = [tok.text(render_chat(engine.tokenizer, body))]
    else:
        tok = Tokenization(engine, body, body.add_special_tokens is not False)
        if not (prompts := _prompts(body)):
            raise invalid("You must pass at least one prompt")
        encoded = [tok.text(p) if isinstance(p, str) else tok.token_ids(p, info.vocab_size) for p in prompts]
    return [ids for ids, _ in encoded], sum(t for _, t in encoded)


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
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


# ---- the router -----------------------------------------------------------------------------------------
def _request_id(request: Request, body: PoolingRequest) -> str:
    return request.headers.get("x-request-id") or body.request_id or f"{uuid.uuid4().int & (2**64 - 1):016x}"


async def _parse(request: Request) -> PoolingRequest:
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, or nesting deeper than the parser goes
        raise invalid("could not parse the request body: it must be UTF-8 encoded JSON") from None
    try:
        return PoolingRequest.model_validate(data)
    except ValidationError as exc:
        raise invalid(describe_validation_error(exc)) from None


def _prompts(body: PoolingRequest) -> list:
    """`input` as a list of prompts (vLLM's prompt_to_seq): a string or one id list is one prompt."""
    raw = body.input
    return [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw or [])


def _usage(prompts: list[list[int]]) -> UsageInfo:
    tokens = sum(len(p) for p in prompts)
    return UsageInfo(prompt_tokens=tokens, total_tokens=tokens)


def _encode_floats(values: list[float], body: PoolingRequest) -> list[float] | str:
    if body.encoding_format == "float":
        return values
    order = {"native": "=", "big": ">", "little": "<"}[body.endianness]
    dtype = np.dtype(("f4" if body.embed_dtype == "float32" else "f2")).newbyteorder(order)
    return base64.b64encode(np.asarray(values, dtype=dtype).tobytes()).decode("ascii")


def compat_router(engine: RewardEngine) -> APIRouter:
    router = APIRouter(tags=["compatibility"])
    info = ModelInfo(engine)
    errors = {code: v for code, v in ERROR_RESPONSES.items() if code != 422}  # request errors are 400, as in vLLM
    openapi_body = {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline_defs(PoolingRequest.model_json_schema())}}}}

    async def score_ids(request: Request, prompts: list[list[int]], deadline: float | None) -> tuple[list, dict]:
        """Like engine.score for token ids: admission checks, deadline, disconnect, finite rewards."""
        if not engine.accepting:
            raise RewardServeError(ErrorKind.UNAVAILABLE, "the server is draining: send to another replica")
        limit = engine.config.max_inputs_per_request
        if len(prompts) > limit:
            raise invalid(f"too many inputs: {len(prompts)} > max_inputs_per_request={limit}")
        rewards, queue_s, compute_s = await run_unless_disconnected(request, engine.score_ids(prompts, deadline))
        if not all(math.isfinite(r) for r in rewards):
            raise RewardServeError(ErrorKind.BACKEND, "the model produced a non-finite reward (NaN or inf)")
        return rewards, timing_headers(ScoreOutcome(engine.name, [], queue_s, compute_s))

    async def pooled(request: Request, body: PoolingRequest, timeout: str | None) -> tuple[list, list, dict]:
        """Token ids per prompt, the values vLLM would return for them, and timing headers."""
        deadline = engine.deadline_from_timeout(parse_timeout_header(timeout))
        if body.messages is None and len(_prompts(body)) >= TOKENIZE_INLINE_MAX:
            prompts, truncated = await asyncio.to_thread(encode_pooling_request, engine, info, body)
        else:
            prompts, truncated = encode_pooling_request(engine, info, body)
        rewards, headers = await score_ids(request, prompts, deadline)
        metrics.observe_results(engine.name, rewards, truncated)
        act = info.activation if body.wants_activation() else (lambda x: x)
        return prompts, [act(r) for r in rewards], headers

    @router.post("/classify", response_model=ClassificationResponse, responses=errors, openapi_extra=openapi_body)
    async def classify(request: Request, timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER)):
        """vLLM's classification API: `probs` is the sigmoid of the reward (raw with `use_activation: false`)."""
        body = await _parse(request)
        engine.check_model(body.model)
        prompts, values, headers = await pooled(request, body, timeout)
        label = info.id2label.get(0)
        response = ClassificationResponse(
            id=f"classify-{_request_id(request, body)}", created=int(time.time()), model=engine.name,
            data=[ClassificationData(index=i, label=label, probs=[v], num_classes=1) for i, v in enumerate(values)],
            usage=_usage(prompts),
        )
        return JSONResponse(response.model_dump(), headers=headers)

    @router.post("/pooling", response_model=PoolingResponse, responses=errors, openapi_extra=openapi_body)
    async def pooling(request: Request, timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER)):
        """vLLM's pooling API (task `classify`): `data` is `[reward]`, sigmoid unless `use_activation: false`."""
        body = await _parse(request)
        engine.check_model(body.model)
        if body.dimensions is not None:
            raise invalid("dimensions is currently not supported")
        if body.task not in (None, "classify"):
            raise invalid(f"Unsupported task: {body.task!r} Supported tasks: ['classify']")
        prompts, values, headers = await pooled(request, body, timeout)
        response = PoolingResponse(
            id=f"pooling-{_request_id(request, body)}", created=int(time.time()), model=engine.name,
            data=[PoolingResponseData(index=i, data=_encode_floats([v], body)) for i, v in enumerate(values)],
            usage=_usage(prompts),
        )
        return JSONResponse(response.model_dump(), headers=headers)

    @router.post("/get_reward", response_model=RewardResponse, responses=ERROR_RESPONSES)
    async def get_reward(
        body: RewardRequest, request: Request, timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER)
    ) -> JSONResponse:
        """OpenRLHF's remote reward model protocol: each query (already templated) is scored as raw text."""
        if not body.query:
            return JSONResponse(RewardResponse(rewards=[], scores=[]).model_dump())
        deadline = engine.deadline_from_timeout(parse_timeout_header(timeout))
        outcome = await run_unless_disconnected(
            request, engine.score([{"raw": q} for q in body.query], deadline=deadline)
        )
        rewards = [r.reward for r in outcome.results]
        payload = RewardResponse(rewards=rewards, scores=rewards)
        return JSONResponse(payload.model_dump(), headers=timing_headers(outcome))

    return router
