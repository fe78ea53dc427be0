"""The forms of an input to a reward model: a prompt/response pair, a conversation, or raw text.

Pure pydantic models (no transport, no torch): the service validates requests with them, rendering turns them
into token ids, and training renders its data through the same path.
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator


Role = Literal["system", "user", "assistant"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ChatMessage(Strict):
    role: Role = Field(description="Who speaks: system, user or assistant.")
    content: str = Field(description="The message text.")


class PromptResponseInput(Strict):
    """A single-turn pair: the prompt becomes the user turn, the response the assistant turn."""

    prompt: str
    response: str


class MessagesInput(Strict):
    """A conversation in OpenAI chat format; the last message is the assistant's response being scored."""

    messages: list[ChatMessage] = Field(min_length=1)

    @model_validator(mode="after")
    def _last_is_assistant(self) -> "MessagesInput":
        if self.messages[-1].role != "assistant":
            raise ValueError("the last message must have role 'assistant' (the response being scored)")
        return self


class RawInput(Strict):
    """A pre-rendered string, scored as is (e.g. policy-templated text); special tokens are not added twice."""

    raw: str


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
    if "prompt" in keys or "response" in keys:
        return "pair"
    return None


ScoreInput = Annotated[
    Union[
        Annotated[PromptResponseInput, Tag("pair")],
        Annotated[MessagesInput, Tag("messages")],
        Annotated[RawInput, Tag("raw")],
    ],
    Discriminator(
        _input_tag,
        custom_error_type="input_form",
        custom_error_message="an input is an object with 'prompt' and 'response', or 'messages', or 'raw'",
    ),
]
