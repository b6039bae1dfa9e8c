"""The `/conversation` protocol, declared once.

Client events are pydantic models: `parse_client_event` validates a raw frame against them and
`docs/PROTOCOL.md` is generated from them (`python -m server.protocol_doc`). Server events are
built only through the `*_event` helpers at the bottom, so their shapes live here too.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Sized
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, ValidationError, ValidationInfo
from pydantic_core import PydanticCustomError

from stt_pool.interface import SAMPLE_RATES


class ErrorCode(StrEnum):
    INVALID_EVENT_TYPE = "INVALID_EVENT_TYPE"
    INVALID_EVENT_DATA = "INVALID_EVENT_DATA"
    MISSING_REQUIRED_FIELD = "MISSING_REQUIRED_FIELD"
    SESSION_NOT_FOUND = "SESSION_NOT_FOUND"
    SESSION_EXPIRED = "SESSION_EXPIRED"
    NO_ACTIVE_MESSAGE = "NO_ACTIVE_MESSAGE"
    AUDIO_TOO_LONG = "AUDIO_TOO_LONG"
    STT_SERVICE_ERROR = "STT_SERVICE_ERROR"
    STT_OVERLOADED = "STT_OVERLOADED"
    LLM_SERVICE_ERROR = "LLM_SERVICE_ERROR"
    SERVICE_TIMEOUT = "SERVICE_TIMEOUT"
    RATE_LIMITED = "RATE_LIMITED"
    INTERNAL_ERROR = "INTERNAL_ERROR"


ERROR_MESSAGES: dict[ErrorCode, str] = {
    ErrorCode.INVALID_EVENT_TYPE: "未知的事件类型，请检查 type 字段",
    ErrorCode.INVALID_EVENT_DATA: "事件数据无效，请检查字段的类型和取值",
    ErrorCode.MISSING_REQUIRED_FIELD: "缺少必需的 data 对象",
    ErrorCode.SESSION_NOT_FOUND: "会话不存在，请先发送 conversation_start 创建会话",
    ErrorCode.SESSION_EXPIRED: "会话已结束，请重新开始对话",
    ErrorCode.NO_ACTIVE_MESSAGE: "当前没有正在录制的消息，请先发送 message_start",
    ErrorCode.AUDIO_TOO_LONG: "录音超过最长时长，已保留此前的录音，请结束本条消息",
    ErrorCode.STT_SERVICE_ERROR: "语音识别服务出错，请稍后重试",
    ErrorCode.STT_OVERLOADED: "语音识别服务繁忙，请稍后再试",
    ErrorCode.LLM_SERVICE_ERROR: "回复生成服务暂时不可用，请稍后重试或直接输入回复",
    ErrorCode.SERVICE_TIMEOUT: "服务响应超时，请稍后重试",
    ErrorCode.RATE_LIMITED: "请求过于频繁，请稍后再试",
    ErrorCode.INTERNAL_ERROR: "服务器内部错误，请稍后重试",
}


def describe(**items: object) -> str:
    """`details` of an error: readable `name: value` pairs (the apps cast `details` to a String)."""
    return "; ".join(f"{name}: {value}" for name, value in items.items())


class ProtocolError(Exception):
    """A failure the client is told about through an `error` event; the connection stays open."""

    def __init__(
        self,
        code: ErrorCode,
        message: str | None = None,
        *,
        session_id: str | None = None,
        details: str | None = None,
    ) -> None:
        super().__init__(code.value)
        self.code = code
        self.message = message or ERROR_MESSAGES[code]
        self.session_id = session_id
        self.details = details


# ---------------------------------------------------------------------------------------------
# Client -> server


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds on what one event may carry, far above what a real conversation needs and far below
    what could exhaust a worker. The values come from the settings (MAX_TEXT_CHARS, ...); each
    bounded field names its limit, and a value beyond it is INVALID_EVENT_DATA."""

    text_chars: int
    label_chars: int
    list_items: int
    history_messages: int


# Which setting bounds a field, by `Limits` attribute (shown in docs/PROTOCOL.md).
LIMIT_SETTINGS = {
    "text_chars": "MAX_TEXT_CHARS",
    "label_chars": "MAX_LABEL_CHARS",
    "list_items": "MAX_LIST_ITEMS",
    "history_messages": "MAX_HISTORY_MESSAGES",
}
LIMIT_UNITS = {
    "text_chars": "characters",
    "label_chars": "characters",
    "list_items": "items",
    "history_messages": "items",
}


def _bounded(limit: str) -> Any:
    """Validator: the value's length is within `Limits.<limit>` of the validation context."""

    def check(value: Sized, info: ValidationInfo) -> Sized:
        maximum: int = getattr(info.context, limit)
        if len(value) > maximum:
            raise PydanticCustomError("too_long", "longer than {limit}", {"limit": maximum})
        return value

    return AfterValidator(check), Field(json_schema_extra={"x-limit": limit})


TextOrEmpty = Annotated[str, Field(strict=True), *_bounded("text_chars")]
RequiredText = Annotated[str, StringConstraints(min_length=1, strict=True), *_bounded("text_chars")]
Label = Annotated[str, StringConstraints(min_length=1, strict=True), *_bounded("label_chars")]
ProfileText = Annotated[str, Field(strict=True), *_bounded("label_chars")]
ProfileList = Annotated[list[ProfileText], *_bounded("list_items")]
# Session ids are echoed in errors and written to logs: only a short id of a fixed alphabet is.
SESSION_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SessionId = Annotated[str, StringConstraints(pattern=SESSION_ID_PATTERN, strict=True)]
AudioChunk = Annotated[str, StringConstraints(min_length=1, strict=True)]
ResponseCount = Annotated[int, Field(ge=1, le=5, strict=True)]


class _EventData(BaseModel):
    # Real clients send extra fields (duration, format, ...): they are ignored, never rejected.
    model_config = ConfigDict(extra="ignore", frozen=True)


class SessionOptions(_EventData):
    """Opt-in extensions, sent as `conversation_start.data.options`. Unknown options are ignored."""

    partial_transcripts: bool = Field(
        False,
        description="Receive `transcript_partial` events (live captions) while a message is recorded, "
        "at most one per `PARTIAL_INTERVAL_MS` (default 200 ms).",
    )
    stream_suggestions: bool = Field(
        False,
        description="Receive each opinion keyword and reply as soon as the provider has written it, as "
        "`suggestion_partial` events, before the usual `opinion_suggestions` / `llm_response` with the full list.",
    )
    opinion_prediction: bool = Field(
        False,
        description="Receive `opinion_prediction_response` (the partner's likely reaction) after each "
        "`user_selected_response` is recorded (always on when the operator sets `OPINION_PREDICTION=true`).",
    )


class Profile(_EventData):
    """A person in the conversation, as the app's profile card holds it; every field may be omitted or null."""

    name: ProfileText | None = Field(None, description="What the person is called.")
    age: Annotated[int, Field(ge=0, le=150, strict=True)] | None = Field(None, description="Age in years.")
    gender: ProfileText | None = Field(None, description="Gender, in the app's words.")
    relations: ProfileList | None = Field(None, description="Relation to the user, e.g. 主治医生, 女儿.")
    personalities: ProfileList | None = Field(None, description="Character traits.")
    preferences: ProfileList | None = Field(None, description="Likes and habits.")
    taboos: ProfileList | None = Field(None, description="Topics or words to avoid.")
    common_topics: ProfileList | None = Field(None, description="What the two often talk about.")

    def given(self) -> dict[str, Any]:
        """The fields the client sent (unknown ones dropped), as `profile_archive` returns them."""
        return self.model_dump(exclude_unset=True)


class HistoryMessage(_EventData):
    """One earlier message of the conversation, as the client stored it."""

    message_id: Label = Field(description="The client's id for the message; the server keeps it.")
    sender: Label = Field(description="Who said it.")
    content: TextOrEmpty = Field(description='What was said; `""` for a recording without recognised speech.')


class ConversationStart(_EventData):
    """Creates a session."""

    response_count: ResponseCount = Field(description="How many reply suggestions each generation returns.")
    scenario_description: TextOrEmpty = Field("", description="Where the conversation takes place and with whom.")
    history_messages: Annotated[list[HistoryMessage], *_bounded("history_messages")] = Field(
        default_factory=list, description="Earlier messages of the conversation, oldest first."
    )
    user_profile: Profile | None = Field(None, description="The app's user (who has the speech impairment).")
    target_profile: Profile | None = Field(
        None, description="The conversation partner: who they are changes what a good reply is."
    )
    options: SessionOptions = Field(default_factory=SessionOptions, description="Opt-in extensions.")


class SessionEvent(_EventData):
    session_id: SessionId = Field(
        description="From `session_created`; only the connection that created it may use it. "
        "At most 64 characters of `A-Z a-z 0-9 _ -`."
    )


class MessageStart(SessionEvent):
    """Cancels the session's running generations and opens a recording for `sender`."""

    sender: Label = Field(description="Who speaks in this recording.")


def _accepted_sample_rate(rate: int) -> int:
    if rate not in SAMPLE_RATES:
        raise ValueError(f"sample_rate must be one of {', '.join(map(str, SAMPLE_RATES))}")
    return rate


class AudioStream(SessionEvent):
    """Appends base64 PCM (s16le) to the open recording."""

    audio_chunk: AudioChunk = Field(
        description="Base64 of the PCM bytes, of any length: chunk boundaries need not fall on sample frames."
    )
    format: Annotated[str, StringConstraints(max_length=32)] | None = Field(
        None, description="The audio encoding: 16-bit PCM only, under any of its accepted names."
    )
    sample_rate: (
        Annotated[int, Field(json_schema_extra={"enum": list(SAMPLE_RATES)}), AfterValidator(_accepted_sample_rate)]
        | None
    ) = Field(None, description="Hz; default `VOSK_SAMPLE_RATE`. Fixed once a recording has audio.")
    channels: Annotated[int, Field(ge=1, le=2)] | None = Field(
        None, description="1 (default) or 2; stereo is interleaved and downmixed by averaging."
    )


class MessageEnd(SessionEvent):
    """Closes the recording, finishes the transcription and records the message."""


class ManualGenerate(SessionEvent):
    """Generates `response_count` replies now (cancels a running opinion generation)."""

    focused_message_ids: Annotated[list[Label], *_bounded("list_items")] = Field(
        default_factory=list, description="Ids of the messages the replies should answer in particular."
    )
    user_opinion: TextOrEmpty = Field(
        "", description="The stance the replies should take, e.g. a chosen opinion suggestion."
    )
    user_corpus: TextOrEmpty = Field(
        "",
        description="The current app's name for `user_opinion` (its typed opinion); used when `user_opinion` is empty.",
    )

    @property
    def opinion(self) -> str:
        return self.user_opinion or self.user_corpus


class UserModification(SessionEvent):
    """Stores a modification (they accumulate) and regenerates the replies."""

    modification: RequiredText = Field(description="How the replies should change, e.g. more polite.")


class UserSelectedResponse(SessionEvent):
    """Records the reply the user chose."""

    selected_content: RequiredText = Field(description="The chosen reply, recorded as a message.")
    sender: Label = Field(description="Who says it (the user).")


class ScenarioSupplement(SessionEvent):
    """Replaces the scenario supplement (the original description is kept)."""

    supplement: RequiredText = Field(description="More about the scenario; replaces the previous supplement.")


class ResponseCountUpdate(SessionEvent):
    """Changes how many replies later generations return."""

    response_count: ResponseCount = Field(description="How many reply suggestions later generations return.")


class ConversationEnd(SessionEvent):
    """Cancels the session's work, answers `profile_archive` and ends the session."""


class SessionResume(SessionEvent):
    """Attaches this connection to an existing session (after a drop or a restart), taking it over from
    any other connection; answers `session_restored`, then every event queued while it was detached."""


class Heartbeat(_EventData):
    """A client's keep-alive: accepted silently, whatever its `data` (or none)."""


CLIENT_EVENTS: dict[str, type[_EventData]] = {
    "conversation_start": ConversationStart,
    "message_start": MessageStart,
    "audio_stream": AudioStream,
    "message_end": MessageEnd,
    "manual_generate": ManualGenerate,
    "user_modification": UserModification,
    "user_selected_response": UserSelectedResponse,
    "scenario_supplement": ScenarioSupplement,
    "response_count_update": ResponseCountUpdate,
    "conversation_end": ConversationEnd,
    "session_resume": SessionResume,
    "heartbeat": Heartbeat,
}

PCM_FORMATS = frozenset({"pcm", "pcm16", "pcm_s16le", "s16le", "raw", "linear16", "l16", "pcm16le"})


def _field_path(location: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in location) or "data"


def _invalid_data(error: ValidationError, session_id: str | None) -> ProtocolError:
    first = error.errors()[0]
    field = _field_path(first["loc"])
    kind = first["type"]
    if kind == "missing":
        reason = f"缺少必需字段 {field}"
    elif kind in {"string_too_short", "too_short"}:
        reason = f"字段 {field} 不能为空"
    elif kind in {"greater_than_equal", "less_than_equal"}:
        reason = f"字段 {field} 超出允许范围"
    elif kind in {"too_long", "string_too_long"}:
        reason = f"字段 {field} 超过长度上限"
    else:
        reason = f"字段 {field} 的类型或取值无效"
    items: dict[str, object] = {"field": field, "reason": kind}
    limit = (first.get("ctx") or {}).get("limit", (first.get("ctx") or {}).get("max_length"))
    if limit is not None:
        items["limit"] = limit
    return ProtocolError(
        ErrorCode.INVALID_EVENT_DATA, f"事件数据无效：{reason}", session_id=session_id, details=describe(**items)
    )


def valid_session_id(value: object) -> str | None:
    """The value if it is a well-formed session id, else None: only such ids are echoed or logged."""
    return value if isinstance(value, str) and re.fullmatch(SESSION_ID_PATTERN, value) else None


def parse_client_event(raw: str | bytes, limits: Limits) -> tuple[str, _EventData]:
    """Validate one client frame; raise ProtocolError with the protocol's error code."""
    try:
        frame = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise ProtocolError(ErrorCode.INVALID_EVENT_DATA, "事件数据无效：不是合法的 JSON") from None
    if not isinstance(frame, dict):
        raise ProtocolError(ErrorCode.INVALID_EVENT_DATA, "事件数据无效：消息必须是 JSON 对象")
    event_type = frame.get("type")
    if not isinstance(event_type, str) or event_type not in CLIENT_EVENTS:
        raise ProtocolError(
            ErrorCode.INVALID_EVENT_TYPE,
            details=describe(type=str(event_type)[:64], accepted=", ".join(sorted(CLIENT_EVENTS))),
        )
    data = frame.get("data")
    if event_type == "heartbeat":
        return event_type, Heartbeat()
    if data is None:
        raise ProtocolError(ErrorCode.MISSING_REQUIRED_FIELD, details=describe(field="data"))
    if not isinstance(data, dict):
        raise ProtocolError(ErrorCode.INVALID_EVENT_DATA, "事件数据无效：data 必须是 JSON 对象")
    session_id = valid_session_id(data.get("session_id"))
    try:
        return event_type, CLIENT_EVENTS[event_type].model_validate(data, context=limits)
    except ValidationError as error:
        raise _invalid_data(error, session_id) from None


# ---------------------------------------------------------------------------------------------
# Server -> client

Status = Literal["idle", "recording_message", "processing_stt", "generating_opinions", "generating_response"]

STATUS_MESSAGES: dict[str, str] = {
    "idle": "空闲",
    "recording_message": "正在录音",
    "processing_stt": "正在识别语音",
    "generating_opinions": "正在生成观点建议",
    "generating_response": "正在生成回复建议",
}

SERVER_EVENTS: dict[str, str] = {
    "session_created": "`session_id`",
    "message_recorded": "`session_id`, `message_id`, `content`, `sender`; `message_content` (= `content`) "
    "only on a message recorded from speech, never on a selected reply",
    "opinion_suggestions": "`session_id`, `suggestions` (3-5 keywords), `request_id`",
    "llm_response": "`session_id`, `suggestions` (exactly `response_count`), `request_id`",
    "status_update": "`session_id`, `status`, `message`",
    "error": "`session_id?`, `error_code`, `message`, `details?` (a string, never an object)",
    "session_restored": "`session_id`, `status` (`active`), `message_count`, `response_count`, `has_modifications`, "
    "`restored_at` (ISO 8601), `scenario_description` (or null); then the events queued while detached, in order",
    "profile_archive": "`session_id`, `user_profile`, `target_profile` (each as given, or null)",
    "transcript_partial": "`session_id`, `text` (opt-in: `options.partial_transcripts`)",
    "suggestion_partial": "`session_id`, `request_id`, `kind` (`opinions`/`replies`), `index`, `text` "
    "(opt-in: `options.stream_suggestions`; in order, before the full list of the same `request_id`)",
    "opinion_prediction_response": "`session_id`, `prediction` (`tendency`, `mood`, `tone`), `request_id` "
    "(opt-in: `options.opinion_prediction` or `OPINION_PREDICTION=true`; after `message_recorded` of a selected reply)",
}

Event = dict[str, Any]
# How a handler or a generation hands an event to its connection.
Send = Callable[[Event], Awaitable[None]]


def encode(event: Event) -> str:
    # orjson writes non-ASCII text unescaped, as the protocol requires.
    return orjson.dumps(event).decode()


def session_created_event(session_id: str) -> Event:
    return {"type": "session_created", "data": {"session_id": session_id}}


def message_recorded_event(session_id: str, message_id: str, content: str, sender: str, *, spoken: bool) -> Event:
    """`content` for the seed-era app, `message_content` (same text) for the current one on spoken
    messages only: for a selected reply the current app shows its own copy, a second would double it."""
    data = {"session_id": session_id, "message_id": message_id, "content": content, "sender": sender}
    if spoken:
        data["message_content"] = content
    return {"type": "message_recorded", "data": data}


def session_restored_event(
    session_id: str, *, message_count: int, response_count: int, has_modifications: bool, scenario_description: str
) -> Event:
    data = {
        "session_id": session_id,
        "status": "active",
        "message_count": message_count,
        "response_count": response_count,
        "has_modifications": has_modifications,
        "restored_at": datetime.now(UTC).isoformat(),
        "scenario_description": scenario_description or None,
    }
    return {"type": "session_restored", "data": data}


def profile_archive_event(
    session_id: str, user_profile: dict[str, Any] | None, target_profile: dict[str, Any] | None
) -> Event:
    """The profiles as the session keeps them: the fields the client gave (`Profile.given()`)."""
    data = {"session_id": session_id, "user_profile": user_profile, "target_profile": target_profile}
    return {"type": "profile_archive", "data": data}


def opinion_suggestions_event(session_id: str, suggestions: list[str], request_id: str) -> Event:
    data = {"session_id": session_id, "suggestions": suggestions, "request_id": request_id}
    return {"type": "opinion_suggestions", "data": data}


def llm_response_event(session_id: str, suggestions: list[str], request_id: str) -> Event:
    data = {"session_id": session_id, "suggestions": suggestions, "request_id": request_id}
    return {"type": "llm_response", "data": data}


def status_update_event(session_id: str, status: Status) -> Event:
    data = {"session_id": session_id, "status": status, "message": STATUS_MESSAGES[status]}
    return {"type": "status_update", "data": data}


def transcript_partial_event(session_id: str, text: str) -> Event:
    return {"type": "transcript_partial", "data": {"session_id": session_id, "text": text}}


def suggestion_partial_event(session_id: str, request_id: str, kind: str, index: int, text: str) -> Event:
    data = {"session_id": session_id, "request_id": request_id, "kind": kind, "index": index, "text": text}
    return {"type": "suggestion_partial", "data": data}


def opinion_prediction_event(session_id: str, prediction: dict[str, str], request_id: str) -> Event:
    data = {"session_id": session_id, "prediction": prediction, "request_id": request_id}
    return {"type": "opinion_prediction_response", "data": data}


def error_event(error: ProtocolError) -> Event:
    data: dict[str, Any] = {"error_code": error.code.value, "message": error.message}
    if error.session_id:
        data["session_id"] = error.session_id
    if error.details:
        data["details"] = error.details
    return {"type": "error", "data": data}
