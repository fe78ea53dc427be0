"""The forms of an input to a reward model: a prompt/response pair, a conversation, or raw text.

Pure pydantic models (no transport, no torch): the service validates requests with them, rendering turns them
into token ids, and training renders its data through the same path.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

Role = Literal["system", "user", "assistant", "tool", "function"]


def check_text(value: str) -> str:
    """Text must be valid Unicode: a lone UTF-16 surrogate (JSON `"\\ud800"`) cannot be tokenized."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = value[exc.start]
        raise ValueError(
            f"text holds a lone UTF-16 surrogate (\\u{ord(bad):04x}) at character {exc.start}: "
            "send valid Unicode"
        ) from None
    return value


Text = Annotated[str, AfterValidator(check_text)]
"""A string field of a request: valid Unicode (checked once, where the request is validated)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Strict):
    """One message, OpenAI chat style. Tool calling is accepted as the OpenAI format has it: an assistant message
    may carry `tool_calls` (its content then may be null), and a `tool` (or legacy `function`) message answers one
    call (`tool_call_id`, `name`). The reward model's chat template renders them; without a template the plain
    format does (see rewardmodel/rendering.py)."""

    role: Role = Field(description="Who speaks: system, user, assistant, tool or function.")
    content: Text | None = Field(default=None, description="The message text (null: an assistant turn that only "
                                 "calls tools).")
    name: Text | None = Field(default=None, description="The tool (or function) a `tool` message answers for.")
    tool_calls: list[dict[str, Any]] | None = Field(
        default=None, description="An assistant message's tool calls (OpenAI format), rendered with the message.")
    tool_call_id: Text | None = Field(default=None, description="The call a `tool` message answers.")

    @model_validator(mode="after")
    def _content_or_calls(self) -> "ChatMessage":
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content is required (only an assistant message with tool_calls may omit it)")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The message as a chat template takes it: role and content, plus the tool fields that are set."""
        out: dict[str, Any] = {"role": self.role, "content": self.content if self.content is not None else ""}
        for key in ("name", "tool_calls", "tool_call_id"):
            if (value := getattr(self, key)) is not None:
                out[key] = value
        return out


REFERENCE = Field(default=None, description="A reference answer the request carries, for rule rewards that check "
                  "the response's final answer against it (GSM8K style: `#### 42`, `\\boxed{42}`, last number).")


class PromptResponseInput(Strict):
    """A single-turn pair: the prompt becomes the user turn, the response the assistant turn. With
    `step_separator`, the response is also read as steps (cut at the separator) by a process reward model."""

    prompt: Text
    response: Text
    reference: Text | None = REFERENCE
    step_separator: Text | None = Field(default=None, min_length=1, description="Process reward models: cut the "
                                        "response into steps at this text, and score each.")


class StepsInput(Strict):
    """A response given as steps, for process reward models: a score is read at the end of every step."""

    prompt: Text
    steps: list[Text] = Field(min_length=1, description="The response's steps, in order.")
    reference: Text | None = REFERENCE


class MessagesInput(Strict):
    """A conversation in OpenAI chat format; the last message is the assistant's response being scored."""

    messages: list[ChatMessage] = Field(min_length=1)
    reference: Text | None = REFERENCE

    @model_validator(mode="after")
    def _last_is_assistant(self) -> "MessagesInput":
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must have role 'assistant' (the response being scored)")
        return self


class RawInput(Strict):
    """A pre-rendered string, scored as is (e.g. policy-templated text); special tokens are not added twice."""

    raw: Text
    reference: Text | None = REFERENCE


def response_text(inp: Any) -> str | None:
    """The response being scored (a pair's response, the last assistant message, the steps joined by newlines),
    or None for raw text, whose response cannot be told apart from its prompt."""
    if isinstance(inp, dict):
        if "raw" in inp:
            return None
        if "steps" in inp:
            return "\n".join(inp["steps"])
        if "messages" in inp:
            return inp["messages"][-1].get("content") or ""
        return inp.get("response")
    if isinstance(inp, PromptResponseInput):
        return inp.response
    if isinstance(inp, StepsInput):
        return "\n".join(inp.steps)
    if isinstance(inp, MessagesInput):
        return inp.messages[-1].content or ""
    return None


def _input_tag(value: object) -> str | None:
    if isinstance(value, dict):
        keys = value.keys()
    elif isinstance(value, BaseModel):
        keys = type(value).model_fields.keys()
    else:
        return None
    if "raw" in keys:
        return "raw"
    if "messages" in keys:
        return "messages"
    if "steps" in keys:
        return "steps"
    if "prompt" in keys or "response" in keys:
        return "pair"
    return None


ScoreInput = Annotated[
    Union[
        Annotated[PromptResponseInput, Tag("pair")],
        Annotated[MessagesInput, Tag("messages")],
        Annotated[RawInput, Tag("raw")],
        Annotated[StepsInput, Tag("steps")],
    ],
    Discriminator(
        _input_tag,
        custom_error_type="input_form",
        custom_error_message="an input is an object with 'prompt' and 'response', or 'messages', or 'raw', or "
        "'prompt' and 'steps'",
    ),
]
