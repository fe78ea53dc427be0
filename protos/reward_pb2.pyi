from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PromptResponse(_message.Message):
    __slots__ = ("prompt", "response", "step_separator")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    STEP_SEPARATOR_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    response: str
    step_separator: str
    def __init__(self, prompt: _Optional[str] = ..., response: _Optional[str] = ..., step_separator: _Optional[str] = ...) -> None: ...

class Steps(_message.Message):
    __slots__ = ("prompt", "steps")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    steps: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, prompt: _Optional[str] = ..., steps: _Optional[_Iterable[str]] = ...) -> None: ...

class Message(_message.Message):
    __slots__ = ("role", "content", "name", "tool_call_id", "tool_calls_json")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_JSON_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    name: str
    tool_call_id: str
    tool_calls_json: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ..., name: _Optional[str] = ..., tool_call_id: _Optional[str] = ..., tool_calls_json: _Optional[str] = ...) -> None: ...

class Conversation(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[Message]
    def __init__(self, messages: _Optional[_Iterable[_Union[Message, _Mapping]]] = ...) -> None: ...

class ScoreInput(_message.Message):
    __slots__ = ("pair", "conversation", "raw", "steps", "reference")
    PAIR_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    pair: PromptResponse
    conversation: Conversation
    raw: str
    steps: Steps
    reference: str
    def __init__(self, pair: _Optional[_Union[PromptResponse, _Mapping]] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., raw: _Optional[str] = ..., steps: _Optional[_Union[Steps, _Mapping]] = ..., reference: _Optional[str] = ...) -> None: ...

class Group(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, members: _Optional[_Iterable[int]] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("model", "inputs", "request_id", "normalize", "groups")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    NORMALIZE_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    model: str
    inputs: _containers.RepeatedCompositeFieldContainer[ScoreInput]
    request_id: str
    normalize: bool
    groups: _containers.RepeatedCompositeFieldContainer[Group]
    def __init__(self, model: _Optional[str] = ..., inputs: _Optional[_Iterable[_Union[ScoreInput, _Mapping]]] = ..., request_id: _Optional[str] = ..., normalize: _Optional[bool] = ..., groups: _Optional[_Iterable[_Union[Group, _Mapping]]] = ...) -> None: ...

class ScoreResult(_message.Message):
    __slots__ = ("reward", "truncated", "tokens", "normalized", "step_rewards", "members", "std", "rules", "advantage", "advantage_centered")
    class MembersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class RulesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    REWARD_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    RULES_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGE_CENTERED_FIELD_NUMBER: _ClassVar[int]
    reward: float
    truncated: bool
    tokens: int
    normalized: float
    step_rewards: _containers.RepeatedScalarFieldContainer[float]
    members: _containers.ScalarMap[str, float]
    std: float
    rules: _containers.ScalarMap[str, float]
    advantage: float
    advantage_centered: float
    def __init__(self, reward: _Optional[float] = ..., truncated: _Optional[bool] = ..., tokens: _Optional[int] = ..., normalized: _Optional[float] = ..., step_rewards: _Optional[_Iterable[float]] = ..., members: _Optional[_Mapping[str, float]] = ..., std: _Optional[float] = ..., rules: _Optional[_Mapping[str, float]] = ..., advantage: _Optional[float] = ..., advantage_centered: _Optional[float] = ...) -> None: ...

class RequestError(_message.Message):
    __slots__ = ("code", "message", "type")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    type: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., type: _Optional[str] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("model", "scores", "request_id", "sequence", "error")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    model: str
    scores: _containers.RepeatedCompositeFieldContainer[ScoreResult]
    request_id: str
    sequence: int
    error: RequestError
    def __init__(self, model: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[ScoreResult, _Mapping]]] = ..., request_id: _Optional[str] = ..., sequence: _Optional[int] = ..., error: _Optional[_Union[RequestError, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RewardStats(_message.Message):
    __slots__ = ("mean", "std")
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    mean: float
    std: float
    def __init__(self, mean: _Optional[float] = ..., std: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("id", "max_model_len", "normalization", "kind", "aliases", "members", "dtype", "forward", "batch_invariant", "compiled")
    class MembersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    NORMALIZATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ALIASES_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    BATCH_INVARIANT_FIELD_NUMBER: _ClassVar[int]
    COMPILED_FIELD_NUMBER: _ClassVar[int]
    id: str
    max_model_len: int
    normalization: RewardStats
    kind: str
    aliases: _containers.RepeatedScalarFieldContainer[str]
    members: _containers.ScalarMap[str, float]
    dtype: str
    forward: str
    batch_invariant: bool
    compiled: bool
    def __init__(self, id: _Optional[str] = ..., max_model_len: _Optional[int] = ..., normalization: _Optional[_Union[RewardStats, _Mapping]] = ..., kind: _Optional[str] = ..., aliases: _Optional[_Iterable[str]] = ..., members: _Optional[_Mapping[str, float]] = ..., dtype: _Optional[str] = ..., forward: _Optional[str] = ..., batch_invariant: _Optional[bool] = ..., compiled: _Optional[bool] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class BestOfNRequest(_message.Message):
    __slots__ = ("model", "prompt", "conversation", "n", "temperature", "top_p", "max_tokens", "seed", "request_id", "aggregate")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    conversation: Conversation
    n: int
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    request_id: str
    aggregate: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., n: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., request_id: _Optional[str] = ..., aggregate: _Optional[str] = ...) -> None: ...

class RankedCandidate(_message.Message):
    __slots__ = ("text", "reward", "rank", "index", "truncated", "tokens", "finish_reason", "step_rewards", "members", "std")
    class MembersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REWARD_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STEP_REWARDS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    text: str
    reward: float
    rank: int
    index: int
    truncated: bool
    tokens: int
    finish_reason: str
    step_rewards: _containers.RepeatedScalarFieldContainer[float]
    members: _containers.ScalarMap[str, float]
    std: float
    def __init__(self, text: _Optional[str] = ..., reward: _Optional[float] = ..., rank: _Optional[int] = ..., index: _Optional[int] = ..., truncated: _Optional[bool] = ..., tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ..., step_rewards: _Optional[_Iterable[float]] = ..., members: _Optional[_Mapping[str, float]] = ..., std: _Optional[float] = ...) -> None: ...

class BestOfNResponse(_message.Message):
    __slots__ = ("model", "generator", "best", "candidates", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    GENERATOR_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    generator: str
    best: RankedCandidate
    candidates: _containers.RepeatedCompositeFieldContainer[RankedCandidate]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., generator: _Optional[str] = ..., best: _Optional[_Union[RankedCandidate, _Mapping]] = ..., candidates: _Optional[_Iterable[_Union[RankedCandidate, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RerankRequest(_message.Message):
    __slots__ = ("model", "prompt", "conversation", "candidates", "request_id", "aggregate")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CONVERSATION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompt: str
    conversation: Conversation
    candidates: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    aggregate: str
    def __init__(self, model: _Optional[str] = ..., prompt: _Optional[str] = ..., conversation: _Optional[_Union[Conversation, _Mapping]] = ..., candidates: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ..., aggregate: _Optional[str] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("model", "candidates", "request_id")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CANDIDATES_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    model: str
    candidates: _containers.RepeatedCompositeFieldContainer[RankedCandidate]
    request_id: str
    def __init__(self, model: _Optional[str] = ..., candidates: _Optional[_Iterable[_Union[RankedCandidate, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...
