"""Chat messages from trainers (TRL, verl) as the server takes them: `{"role", "content"}` with text content.

Roles pass through as given (system, user, assistant, and tool calling's `tool` / legacy `function`); the server
checks them. Tool calling, OpenAI style as TRL 1.16 produces it: an assistant message may carry `tool_calls`
(its content is then often empty) and each tool result is a `{"role": "tool", "name", "content"}` message. So
that the reward model sees what the policy did, an assistant message's tool calls are appended to its content,
one block per call, as the Hermes / Qwen chat templates write them:

    <tool_call>
    {"name": "multiply", "arguments": {"a": 3, "b": 4}}
    </tool_call>

(separated from any text before it by a newline), and `tool_calls` itself is not sent: the call is then in the
text whatever the reward model's chat template does with tool calls (many ignore them). A tool (or function)
message keeps its `name` and `tool_call_id` when they are strings; other keys are dropped. Content given as a
list of parts keeps its text parts (joined); images and other parts are dropped.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

from .errors import InvalidInputError

TOOL_CALL_OPEN = "<tool_call>\n"
TOOL_CALL_CLOSE = "\n</tool_call>"


def message_text(content: Any) -> str:
    """A message's content as text: a string as is; a list of content parts (`{"type": "text", "text": ...}`)
    joined; None (an assistant turn that only calls tools) as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return "".join(part.get("text", "") if isinstance(part, Mapping) else str(part) for part in content)
    return str(content)


def tool_call_json(call: Any) -> str:
    """One tool call as `{"name": ..., "arguments": ...}` JSON. Takes OpenAI's `{"type": "function",
    "function": {"name", "arguments"}}` (arguments a dict, or a JSON string as OpenAI sends it) or a bare
    `{"name", "arguments"}`; anything else is written as JSON as it is."""
    function = call.get("function", call) if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping) or "name" not in function:
        return json.dumps(call, ensure_ascii=False, default=str)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            pass  # not JSON: kept as the string it is
    return json.dumps({"name": function["name"], "arguments": arguments}, ensure_ascii=False, default=str)


def render_tool_calls(tool_calls: Any) -> str:
    """The `<tool_call>` blocks of an assistant message's tool calls ("" for none)."""
    if tool_calls is None:
        return ""
    calls = [tool_calls] if isinstance(tool_calls, (str, Mapping)) else list(tool_calls)  # list: numpy arrays too
    return "\n".join(f"{TOOL_CALL_OPEN}{tool_call_json(call)}{TOOL_CALL_CLOSE}" for call in calls)


TOOL_ROLES = ("tool", "function")
TOOL_FIELDS = ("name", "tool_call_id")


def clean_message(message: Mapping[str, Any]) -> dict[str, str]:
    """One message as `{"role", "content"}`, plus a tool message's `name` / `tool_call_id` (see the module
    docstring). Anything but a mapping with a "role" is an InvalidInputError."""
    if not isinstance(message, Mapping):
        raise InvalidInputError(f"a message is a mapping with 'role' and 'content', got {type(message).__name__}",
                                type="invalid_argument")
    if message.get("role") is None:
        raise InvalidInputError(f"a message needs a 'role', got the keys {sorted(map(str, message))}",
                                type="invalid_argument")
    role = str(message["role"])
    text = message_text(message.get("content"))
    calls = render_tool_calls(message.get("tool_calls"))
    if calls:
        text = f"{text}\n{calls}" if text else calls
    out = {"role": role, "content": text}
    if role in TOOL_ROLES:
        out.update((key, message[key]) for key in TOOL_FIELDS if isinstance(message.get(key), str))
    return out


def clean_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages as the server takes them: `role` and text `content` (tool calls rendered into it), plus the
    `name` / `tool_call_id` of tool messages. A malformed message is an InvalidInputError naming it
    (`messages.J: ...`)."""
    out = []
    for j, message in enumerate(messages):
        try:
            out.append(clean_message(message))
        except InvalidInputError as exc:
            raise InvalidInputError(f"messages.{j}: {exc.message}", type="invalid_argument") from None
    return out
