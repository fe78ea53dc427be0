"""Transport-free request and result models (pydantic). HTTP uses them as its body schema;
gRPC converts its protobuf messages into them, so both transports validate the same way."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError, model_validator

from rewardmodel.inputs import (  # noqa: F401  (the input forms, re-exported for the transports)
    ChatMessage, MessagesInput, PromptResponseInput, RawInput, ScoreInput, Strict, Text,
)
from service.errors import invalid

_INPUTS = TypeAdapter(list[ScoreInput])


_TAGS = {"pair", "messages", "raw", "steps"}


def _is_tag(loc: tuple, i: int) -> bool:
    """Discriminator tags show up in error locations right after a list index; they are not fields."""
    return loc[i] in _TAGS and i > 0 and isinstance(loc[i - 1], int) and i + 1 < len(loc)


def describe_validation_error(exc: Any, prefix: str = "") -> str:
    """One readable line per problem, each naming the field (e.g. `inputs.2.messages.0.role: ...`).

    Takes a pydantic ValidationError or FastAPI's RequestValidationError (whose locations start with "body").
    """
    lines = []
    for err in exc.errors():
        loc = tuple(err.get("loc", ()))
        if loc[:1] == ("body",):
            loc = loc[1:]
        parts = [p for i, p in enumerate(loc) if not _is_tag(loc, i)]
        loc = ".".join(str(p) for p in (prefix, *parts) if p != "")
        lines.append(f"{loc}: {err['msg']}" if loc else err["msg"])
    return "; ".join(lines)


def parse_inputs(raw: list[dict]) -> list:
    """Validate plain dicts (from gRPC or Python callers) into input models; bad ones -> INVALID_ARGUMENT."""
    try:
        return _INPUTS.validate_python(raw)
    except ValidationError as exc:
        raise invalid(describe_validation_error(exc, "inputs")) from None


class ScoreResult(BaseModel):
    reward: float = Field(description="Raw logit of the reward head (an ensemble: its combined reward; a process "
                          "reward model: the last step's score).")
    truncated: bool = Field(description="True when the input was cut from the left to fit the token limit.")
    tokens: int = Field(description="Tokens scored (after truncation).")
    normalized: float | None = Field(
        default=None, description="(reward - mean) / std with the model's stats; only when asked for."
    )
    step_rewards: list[float] | None = Field(
        default=None, description="A process reward model: the raw score at the end of each step.")
    members: dict[str, float] | None = Field(
        default=None, description="An ensemble: each member's reward (what the member alone answers).")
    std: float | None = Field(default=None, description="An ensemble: the std of the values it combined.")
    rules: dict[str, float] | None = Field(
        default=None, description="An ensemble with rule terms: each rule's value (before its weight).")
    advantage: float | None = Field(
        default=None, description="With `groups`: (reward - group mean) / (group std + 1e-4); 0 for an all-equal "
        "group.")
    advantage_centered: float | None = Field(
        default=None, description="With `groups`: reward - group mean (Dr. GRPO, no std scaling).")


# ---- Best-of-N and rerank ------------------------------------------------------------------------------
SEED_MAX = 2**32 - 1


class _PromptOrMessages(Strict):
    """The context the candidates answer: a `prompt` (one user turn) or `messages` (not ending with the
    assistant: the candidates are the assistant's reply)."""

    model: str | None = Field(default=None, description="A served model or ensemble (default: the first model).")
    prompt: Text | None = Field(default=None, description="The user's prompt (or give `messages`).")
    messages: list[ChatMessage] | None = Field(
        default=None, min_length=1,
        description="The conversation so far (or give `prompt`); not ending with the assistant.",
    )
    timeout: float | None = Field(
        default=None, gt=0, description="Seconds before the request fails with 504 (also the X-Request-Timeout header)."
    )
    aggregate: Literal["last", "min", "mean", "product"] | None = Field(
        default=None, description="A process reward model: how its step scores rank a candidate: the last step's, the "
        "min, the mean, or `product` (the log of the product of the step probabilities); default `last`.")

    @model_validator(mode="after")
    def _one_context(self) -> "_PromptOrMessages":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        if self.messages is not None and self.messages[-1].role == "assistant":
            raise ValueError("messages: the last message must not be the assistant's (the candidates are its reply)")
        return self

    def conversation(self) -> list[dict[str, str]]:
        """The context as chat messages (a prompt is one user turn)."""
        if self.messages is not None:
            return [m.as_dict() for m in self.messages]
        return [{"role": "user", "content": self.prompt or ""}]

    def scored_input(self, candidate: str) -> PromptResponseInput | MessagesInput:
        """What the reward model scores for one candidate: exactly what /v1/score gets for the same pair."""
        if self.messages is not None:
            return MessagesInput(messages=[*self.messages, ChatMessage(role="assistant", content=candidate)])
        return PromptResponseInput(prompt=self.prompt or "", response=candidate)


class BestOfNRequest(_PromptOrMessages):
    n: int = Field(default=4, ge=1, description="Candidates to generate (at most the server's max_n).")
    temperature: float = Field(default=1.0, ge=0, le=2, description="Sampling temperature; 0 is greedy.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=128, ge=1, description="Most new tokens per candidate (at most max_new_tokens).")
    seed: int | None = Field(
        default=None, ge=0, le=SEED_MAX,
        description="Seed: the same request with the same seed gets the same candidates.",
    )


class RerankRequest(_PromptOrMessages):
    candidates: list[Text] = Field(min_length=1, description="Responses to the context, to score and rank.")


class RankedCandidate(BaseModel):
    text: str = Field(description="The candidate response.")
    reward: float = Field(description="Raw logit of the reward model for (context, text) (a process reward model: "
                          "its step scores aggregated as asked).")
    rank: int = Field(description="1 for the highest reward; ties keep request/sample order.")
    index: int = Field(description="Position in the request's candidates (rerank) or in sample order (best-of-n).")
    truncated: bool = Field(description="True when (context, text) was cut from the left to fit the token limit.")
    tokens: int = Field(description="Tokens the reward model scored.")
    finish_reason: str | None = Field(
        default=None, description="best-of-n: `stop` (the policy ended its turn) or `length` (max_tokens reached)."
    )
    step_rewards: list[float] | None = Field(default=None, description="A process reward model's step scores.")
    members: dict[str, float] | None = Field(default=None, description="An ensemble's member rewards.")
    std: float | None = Field(default=None, description="An ensemble: the std of the values it combined.")


class BestCandidate(BaseModel):
    text: str
    reward: float


class BestOfNResponse(BaseModel):
    model: str = Field(description="The reward model.")
    generator: str = Field(description="The policy that generated the candidates.")
    best: BestCandidate
    candidates: list[RankedCandidate] = Field(description="Every candidate, best first.")


class RerankResponse(BaseModel):
    model: str = Field(description="The reward model.")
    candidates: list[RankedCandidate] = Field(description="Every candidate, best first.")


def parse_request(model: type[BaseModel], data: dict, prefix: str = "") -> Any:
    """Validate a plain dict (e.g. from gRPC) into `model`; problems -> INVALID_ARGUMENT naming the field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise invalid(describe_validation_error(exc, prefix)) from None
