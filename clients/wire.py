"""The generated gRPC modules (`reward_pb2`, `reward_pb2_grpc`) of the `protos` package beside this one, and the
one conversion every gRPC request with messages needs.

Imported as `rewardserve.clients` (the documented import face), the clients use `rewardserve.protos`, so a
user's own top-level `protos` package cannot shadow ours; imported as the top-level `clients` (inside this
repository, the server's tests), they use the top-level `protos`. Both names load the same files, and protobuf
keeps one descriptor (and one message class) per message however many names load them.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

if __package__ == "rewardserve.clients":
    from ..protos import reward_pb2, reward_pb2_grpc
else:
    from protos import reward_pb2, reward_pb2_grpc

__all__ = ["reward_pb2", "reward_pb2_grpc", "proto_message"]


def proto_message(message: Mapping[str, Any]) -> Any:
    """A chat message (the HTTP JSON form) as a `Message`: an assistant's `tool_calls` list travels as the JSON
    string `tool_calls_json`; unset (None) fields are left out. A key the message has no field for, or a value
    of the wrong type, raises TypeError / ValueError."""
    if not isinstance(message, Mapping):
        raise TypeError(f"a message is an object with 'role' and 'content', got {type(message).__name__}")
    fields = {key: value for key, value in message.items() if value is not None}
    if "tool_calls" in fields:
        fields["tool_calls_json"] = json.dumps(fields.pop("tool_calls"), ensure_ascii=False)
    return reward_pb2.Message(**fields)
