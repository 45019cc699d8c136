from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "prompt_logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    logprobs: int
    prompt_logprobs: int
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., logprobs: _Optional[int] = ..., prompt_logprobs: _Optional[int] = ...) -> None: ...

class TargetLogprob(_message.Message):
    __slots__ = ("token", "logprob", "top_tokens", "top_logprobs")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    top_tokens: _containers.RepeatedScalarFieldContainer[int]
    top_logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., top_tokens: _Optional[_Iterable[int]] = ..., top_logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("shape", "data")
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class OpenSession(_message.Message):
    __slots__ = ("session_id", "token_ids", "params", "draft_worker", "prompt_len")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_WORKER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    params: SamplingParams
    draft_worker: str
    prompt_len: int
    def __init__(self, session_id: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., params: _Optional[_Union[SamplingParams, _Mapping]] = ..., draft_worker: _Optional[str] = ..., prompt_len: _Optional[int] = ...) -> None: ...

class DraftSegment(_message.Message):
    __slots__ = ("session_id", "segment_id", "committed_len", "tokens", "draft_probs", "confidence", "priority")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DRAFT_PROBS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    segment_id: int
    committed_len: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    draft_probs: Tensor
    confidence: _containers.RepeatedScalarFieldContainer[float]
    priority: float
    def __init__(self, session_id: _Optional[str] = ..., segment_id: _Optional[int] = ..., committed_len: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., draft_probs: _Optional[_Union[Tensor, _Mapping]] = ..., confidence: _Optional[_Iterable[float]] = ..., priority: _Optional[float] = ...) -> None: ...

class CloseSession(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DraftMessage(_message.Message):
    __slots__ = ("open", "segment", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenSession
    segment: DraftSegment
    close: CloseSession
    def __init__(self, open: _Optional[_Union[OpenSession, _Mapping]] = ..., segment: _Optional[_Union[DraftSegment, _Mapping]] = ..., close: _Optional[_Union[CloseSession, _Mapping]] = ...) -> None: ...

class VerifyResult(_message.Message):
    __slots__ = ("session_id", "segment_id", "committed_len", "num_drafts", "accepted", "tokens", "finished", "finish_reason", "stop_text_len", "features", "feature_start", "num_proposed", "verify_budget", "logprobs", "prompt_logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOP_TEXT_LEN_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    FEATURE_START_FIELD_NUMBER: _ClassVar[int]
    NUM_PROPOSED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    segment_id: int
    committed_len: int
    num_drafts: int
    accepted: int
    tokens: _containers.RepeatedScalarFieldContainer[int]
    finished: bool
    finish_reason: str
    stop_text_len: int
    features: Tensor
    feature_start: int
    num_proposed: int
    verify_budget: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TargetLogprob]
    prompt_logprobs: _containers.RepeatedCompositeFieldContainer[TargetLogprob]
    def __init__(self, session_id: _Optional[str] = ..., segment_id: _Optional[int] = ..., committed_len: _Optional[int] = ..., num_drafts: _Optional[int] = ..., accepted: _Optional[int] = ..., tokens: _Optional[_Iterable[int]] = ..., finished: _Optional[bool] = ..., finish_reason: _Optional[str] = ..., stop_text_len: _Optional[int] = ..., features: _Optional[_Union[Tensor, _Mapping]] = ..., feature_start: _Optional[int] = ..., num_proposed: _Optional[int] = ..., verify_budget: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TargetLogprob, _Mapping]]] = ..., prompt_logprobs: _Optional[_Iterable[_Union[TargetLogprob, _Mapping]]] = ...) -> None: ...

class VerifyError(_message.Message):
    __slots__ = ("session_id", "segment_id", "code", "message", "committed_len")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        UNKNOWN: _ClassVar[VerifyError.Code]
        STALE: _ClassVar[VerifyError.Code]
        INVALID: _ClassVar[VerifyError.Code]
        NOT_OPEN: _ClassVar[VerifyError.Code]
        EXHAUSTED: _ClassVar[VerifyError.Code]
    UNKNOWN: VerifyError.Code
    STALE: VerifyError.Code
    INVALID: VerifyError.Code
    NOT_OPEN: VerifyError.Code
    EXHAUSTED: VerifyError.Code
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_ID_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_LEN_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    segment_id: int
    code: VerifyError.Code
    message: str
    committed_len: int
    def __init__(self, session_id: _Optional[str] = ..., segment_id: _Optional[int] = ..., code: _Optional[_Union[VerifyError.Code, str]] = ..., message: _Optional[str] = ..., committed_len: _Optional[int] = ...) -> None: ...

class VerifyMessage(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: VerifyResult
    error: VerifyError
    def __init__(self, result: _Optional[_Union[VerifyResult, _Mapping]] = ..., error: _Optional[_Union[VerifyError, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatsReply(_message.Message):
    __slots__ = ("verifier_id", "active_sessions", "kv_blocks_used", "steps", "segments", "proposed_drafts", "verified_drafts", "accepted_drafts", "scheduling")
    VERIFIER_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    PROPOSED_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_DRAFTS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULING_FIELD_NUMBER: _ClassVar[int]
    verifier_id: str
    active_sessions: int
    kv_blocks_used: int
    steps: int
    segments: int
    proposed_drafts: int
    verified_drafts: int
    accepted_drafts: int
    scheduling: str
    def __init__(self, verifier_id: _Optional[str] = ..., active_sessions: _Optional[int] = ..., kv_blocks_used: _Optional[int] = ..., steps: _Optional[int] = ..., segments: _Optional[int] = ..., proposed_drafts: _Optional[int] = ..., verified_drafts: _Optional[int] = ..., accepted_drafts: _Optional[int] = ..., scheduling: _Optional[str] = ...) -> None: ...
