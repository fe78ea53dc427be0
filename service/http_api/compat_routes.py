"""Compatibility routes: OpenRLHF's remote RM protocol and vLLM's pooling and tokenizer APIs, on the same engine.

Transport only: decode -> the named model's `score` (the one way in, with vLLM's tokenization as the encoder for
the vLLM routes, which score single models) -> encode.

- `POST /get_reward` (OpenRLHF): `{"query": [...], "prompts": [...], "labels": [...]}` ->
  `{"rewards": [...], "scores": [...], "extra_logs": {}}`; each query is already-templated text, scored raw.
- `POST /classify`, `POST /pooling`, `POST /tokenize`, `POST /detokenize` (vLLM 0.32): request and response
  shapes as vLLM's (service/http_api/vllm_protocol.py). Request errors are 400, as vLLM answers them, in our
  error format; a body that is not JSON is 400 too.
"""

from __future__ import annotations

import asyncio
import json
import time

import numpy as np
import uuid
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rewardmodel.inputs import Text
from rewardmodel.rendering import RenderError, token_ids
from rewardmodel.steps import StepEncoded

from service.engine import TOKENIZE_INLINE_MAX_CHARS, RewardEngine, input_chars
from service.house import ModelHouse
from service.errors import invalid
from service.http_api.common import (
    ERROR_RESPONSES, TIMEOUT_HEADER, not_json_message, parse_timeout_header, run_unless_disconnected, timing_headers,
)
from service.http_api.vllm_protocol import (
    ChatPrompt, ClassificationData, ClassificationResponse, DetokenizeRequest, DetokenizeResponse, ModelInfo,
    PoolingRequest, PoolingResponse, PoolingResponseData, TokenizeRequest, TokenizeResponse, TruncatingTokenizer,
    VllmEncoder, encode_floats, inline_defs, prompts_of, render_chat, usage_of,
)
from service.schemas import describe_validation_error


# ---- OpenRLHF ------------------------------------------------------------------------------------------
class RewardRequest(BaseModel):
    """What OpenRLHF's remote RM client POSTs (openrlhf/utils/agent.py, _fetch_rewards_via_http);
    older clients (openrlhf/utils/remote_rm_utils.py, remote_rm_fn) send `query` alone."""

    model_config = ConfigDict(extra="ignore")

    query: list[Text] = Field(description="Prompt + response, already templated by the policy; scored as raw text.")
    prompts: list[Any] | None = Field(default=None, description="The prompts alone (accepted, not used).")
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


class StepTags:
    """vLLM's STEP pooling reads a PRM at every position holding the step tag token."""

    def __init__(self, encoder: VllmEncoder, tag: int):
        self.encoder, self.tag = encoder, tag

    def __call__(self, prompt: Any) -> StepEncoded:
        enc = self.encoder(prompt)
        ends = [i for i, t in enumerate(enc.input_ids) if t == self.tag]
        if not ends:
            raise invalid(f"no step tag (token id {self.tag}, the end of the model's step separator) in the prompt")
        return StepEncoded(enc.input_ids, ends, enc.truncated)


# ---- request parsing --------------------------------------------------------------------------------------
def _request_id(request: Request, body: Any) -> str:
    own = getattr(body, "request_id", None)
    return request.headers.get("x-request-id") or own or f"{uuid.uuid4().int & (2**64 - 1):016x}"


def _is_json(request: Request) -> bool:
    """vLLM (FastAPI) parses a body as JSON when it says so or says nothing."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    return not content_type or content_type == "application/json" or content_type.endswith("+json")


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    if not _is_json(request):
        raise invalid(not_json_message(request.headers.get("content-type")))
    try:
        data = json.loads(await request.body())
    except (ValueError, RecursionError):  # bad UTF-8 / JSON, or nesting deeper than the parser goes
        raise invalid("could not parse the request body: it must be UTF-8 encoded JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(describe_validation_error(exc)) from None


def _openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": inline_defs(model.model_json_schema())}}}}


# ---- the router -----------------------------------------------------------------------------------------
class _Tokenizing:
    """What the vLLM routes need of one model's backbone, made once: its checkpoint facts and a private
    truncating tokenizer."""

    def __init__(self, engine: RewardEngine):
        self.info = ModelInfo(engine.backend, engine.tokenizer)
        self.truncating = TruncatingTokenizer(engine.tokenizer)


def compat_router(house: ModelHouse) -> APIRouter:
    router = APIRouter(tags=["compatibility"])
    errors = {code: v for code, v in ERROR_RESPONSES.items() if code != 422}  # request errors are 400, as in vLLM
    tokenizing: dict[int, _Tokenizing] = {}

    def single(name: str | None) -> tuple[Any, _Tokenizing]:
        """The named model (vLLM's routes read one model's tokenizer and head), or an ensemble of heads of one
        backbone without rules or a prompt-reading gate (a multi-head overlay under its own name)."""
        scorer = house.resolve(name)
        unfit = scorer.unfit_for_token_routes() if scorer.kind != "model" else None
        if unfit:
            raise invalid(f"{scorer.name!r} is an ensemble that {unfit}: vLLM's routes score a single model or an "
                          "ensemble of heads of one backbone without rules or a prompt-reading gate; use /v1/score")
        engine = scorer.engine
        if id(engine) not in tokenizing:
            tokenizing[id(engine)] = _Tokenizing(engine)
        return scorer, tokenizing[id(engine)]

    async def pooled(request: Request, body: PoolingRequest, timeout: str | None) -> tuple[Any, list, list, dict]:
        """The model, token counts per prompt, the values vLLM would return for them, and timing headers."""
        scorer, tk = single(body.model)
        deadline = house.deadline_from_timeout(parse_timeout_header(timeout))
        prompts = [ChatPrompt(body)] if body.messages is not None else prompts_of(body)  # vLLM prefers the chat
        if not prompts:
            raise invalid("You must pass at least one prompt")
        encoder = VllmEncoder(scorer.tokenizer, tk.truncating, scorer.max_length, tk.info.vocab_size, body)
        outcome = await run_unless_disconnected(
            request, scorer.score(prompts, deadline=deadline, encoder=encoder, field="input"))
        act = tk.info.activation if body.wants_activation() else (lambda x: x)
        counts = [r.tokens for r in outcome.results]
        return scorer, counts, [act(r.reward) for r in outcome.results], timing_headers(outcome)

    @router.post("/classify", response_model=ClassificationResponse, responses=errors,
                 openapi_extra=_openapi_body(PoolingRequest))
    async def classify(request: Request, timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER)):
        """vLLM's classification API: `probs` is the sigmoid of the reward (raw with `use_activation: false`)."""
        body = await _parse(request, PoolingRequest)
        scorer, counts, values, headers = await pooled(request, body, timeout)
        label = tokenizing[id(scorer.engine)].info.id2label.get(0)
        response = ClassificationResponse(
            id=f"classify-{_request_id(request, body)}", created=int(time.time()), model=scorer.name,
            data=[ClassificationData(index=i, label=label, probs=[v], num_classes=1) for i, v in enumerate(values)],
            usage=usage_of(counts),
        )
        return JSONResponse(response.model_dump(), headers=headers)

    @router.post("/pooling", response_model=PoolingResponse, responses=errors,
                 openapi_extra=_openapi_body(PoolingRequest))
    async def pooling(request: Request, timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER)):
        """vLLM's pooling API (task `classify`): `data` is `[reward]`, sigmoid unless `use_activation: false`."""
        body = await _parse(request, PoolingRequest)
        if body.dimensions is not None:
            raise invalid("dimensions is currently not supported")
        if house.resolve(body.model).kind == "model" and house.resolve(body.model).prm is not None:
            return await step_pooling(request, body, timeout)
        if body.task not in (None, "classify"):
            raise invalid(f"Unsupported task: {body.task!r} Supported tasks: ['classify']")
        scorer, counts, values, headers = await pooled(request, body, timeout)
        response = PoolingResponse(
            id=f"pooling-{_request_id(request, body)}", created=int(time.time()), model=scorer.name,
            data=[PoolingResponseData(index=i, data=encode_floats([v], body)) for i, v in enumerate(values)],
            usage=usage_of(counts),
        )
        return JSONResponse(response.model_dump(), headers=headers)

    async def step_pooling(request: Request, body: PoolingRequest, timeout: str | None) -> JSONResponse:
        """A process reward model as vLLM's STEP pooler answers: for each prompt, at every position holding the
        step tag (the last token of the model's step separator), the labels' softmax ([bad, good]), or the raw
        logits with `use_activation: false`."""
        if body.task not in (None, "token_classify"):
            raise invalid(f"Unsupported task: {body.task!r} Supported tasks: ['token_classify']")
        scorer, tk = single(body.model)
        spec = scorer.prm
        tag = token_ids(scorer.tokenizer, spec.step_separator, add_special_tokens=False)[-1]
        deadline = house.deadline_from_timeout(parse_timeout_header(timeout))
        prompts = [ChatPrompt(body)] if body.messages is not None else prompts_of(body)
        if not prompts:
            raise invalid("You must pass at least one prompt")
        encoder = StepTags(VllmEncoder(scorer.tokenizer, tk.truncating, scorer.max_length, tk.info.vocab_size, body),
                           tag)
        with scorer.admit(len(prompts), field="input") as reservation:  # released however it ends
            evaluated = await run_unless_disconnected(request, scorer.engine.evaluate(
                prompts, deadline=deadline, encoder=encoder, reservation=reservation, field="input"))
        data = []
        for i, values in enumerate(evaluated.values):
            logits = values[:, scorer.column:scorer.column + spec.num_labels].astype(np.float64)
            if body.wants_activation():
                logits = np.exp(logits - logits.max(axis=1, keepdims=True))
                logits = logits / logits.sum(axis=1, keepdims=True)
            data.append(PoolingResponseData(index=i, data=[[float(x) for x in row] for row in logits]))
        response = PoolingResponse(
            id=f"pooling-{_request_id(request, body)}", created=int(time.time()), model=scorer.name, data=data,
            usage=usage_of([e.tokens for e in evaluated.encoded]),
        )
        return JSONResponse(response.model_dump(), headers=timing_headers(evaluated))

    @router.post("/tokenize", response_model=TokenizeResponse, responses=errors,
                 openapi_extra=_openapi_body(TokenizeRequest))
    async def tokenize(request: Request):
        """vLLM's tokenizer API: the reward model's token ids for `prompt` (special tokens added by default) or
        for `messages` rendered with its chat template (generation prompt added by default, as vLLM does)."""
        body = await _parse(request, TokenizeRequest)
        scorer, _ = single(body.model)
        tokenizer = scorer.tokenizer

        def tokenize_body() -> tuple[list[int], list[str] | None]:
            if body.messages is not None:
                ids = token_ids(tokenizer, render_chat(tokenizer, body), bool(body.add_special_tokens))
            else:
                ids = token_ids(tokenizer, body.prompt or "", body.add_special_tokens is not False)
            return ids, tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None

        try:  # a long text off the event loop: other requests are answered meanwhile
            long = input_chars(body.messages or body.prompt or "") > TOKENIZE_INLINE_MAX_CHARS
            ids, strs = await asyncio.to_thread(tokenize_body) if long else tokenize_body()
        except RenderError as exc:
            raise invalid(str(exc)) from None
        payload = TokenizeResponse(count=len(ids), max_model_len=scorer.max_length, tokens=ids, token_strs=strs)
        return JSONResponse(payload.model_dump())

    @router.post("/detokenize", response_model=DetokenizeResponse, responses=errors,
                 openapi_extra=_openapi_body(DetokenizeRequest))
    async def detokenize(request: Request):
        """vLLM's detokenizer API: the text of token ids (special tokens included, as vLLM decodes)."""
        body = await _parse(request, DetokenizeRequest)
        scorer, tk = single(body.model)
        bad = [t for t in body.tokens if not 0 <= t < tk.info.vocab_size]
        if bad:
            raise invalid(f"Token id {bad[0]} is out of vocabulary (ids must be in [0, {tk.info.vocab_size}))")
        return JSONResponse(DetokenizeResponse(prompt=scorer.tokenizer.decode(body.tokens)).model_dump())

    @router.post("/get_reward", response_model=RewardResponse, responses=ERROR_RESPONSES)
    async def get_reward(
        body: RewardRequest, request: Request, timeout: str | None = Header(default=None, alias=TIMEOUT_HEADER),
        model: str | None = Query(default=None, description="A served model or ensemble (OpenRLHF sends no name: "
                                  "put it in --remote_rm_url, e.g. http://host:8000/get_reward?model=helpful)."),
    ) -> JSONResponse:
        """OpenRLHF's remote reward model protocol: each query (already templated) is scored as raw text."""
        if not body.query:
            return JSONResponse(RewardResponse(rewards=[], scores=[]).model_dump())
        deadline = house.deadline_from_timeout(parse_timeout_header(timeout))
        outcome = await run_unless_disconnected(
            request, house.score([{"raw": q} for q in body.query], model=model, deadline=deadline, field="query")
        )
        rewards = [r.reward for r in outcome.results]
        payload = RewardResponse(rewards=rewards, scores=rewards)
        return JSONResponse(payload.model_dump(), headers=timing_headers(outcome))

    return router



