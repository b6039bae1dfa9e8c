"""The `/conversation` state machine for one WebSocket connection.

One handler per client event, each reading like its sequence in PROTOCOL.md. The dispatcher
validates the frame, resolves the session (only sessions this connection owns) and turns every
`ProtocolError` into one `error` event; the connection stays open whatever the client sends.
The handler does not know how audio reaches Vosk: it talks to a `Transcriber`.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from config import Settings
from llm.interface import Task
from server import metrics
from server.audio import decode_chunk
from server.generation import GenerationManager
from server.protocol import (
    AudioStream,
    ConversationEnd,
    ConversationStart,
    ErrorCode,
    Event,
    Heartbeat,
    Limits,
    ManualGenerate,
    MessageEnd,
    MessageStart,
    ProtocolError,
    ResponseCountUpdate,
    ScenarioSupplement,
    Send,
    SessionEvent,
    UserModification,
    UserSelectedResponse,
    describe,
    error_event,
    message_recorded_event,
    parse_client_event,
    profile_archive_event,
    session_created_event,
    status_update_event,
    transcript_partial_event,
)
from server.recordings import Recording, Recordings
from server.sessions import Session, SessionStore
from stt_pool.errors import AudioTooLong, BufferFull, SampleRateChanged, SttError, SttOverloaded, SttTimeout
from stt_pool.interface import PartialCallback, Transcriber, TranscriptStream

log = logging.getLogger("server.conversation")
KEPT_FOR_RETRY = "，录音已保留，请重新发送 message_end"


@contextmanager
def stt_errors(session_id: str, stream: TranscriptStream | None = None, *, finishing: bool = False) -> Iterator[None]:
    """Turn a transcriber failure into the protocol's error for it; `finishing`: the recording stays open."""
    try:
        yield
    except SttError as error:
        raise stt_protocol_error(error, session_id, stream, finishing) from None


def stt_protocol_error(
    error: SttError, session_id: str, stream: TranscriptStream | None, finishing: bool
) -> ProtocolError:
    if isinstance(error, SttOverloaded):
        return ProtocolError(ErrorCode.STT_OVERLOADED, session_id=session_id)
    if isinstance(error, AudioTooLong) and stream is not None:
        return ProtocolError(
            ErrorCode.AUDIO_TOO_LONG, session_id=session_id, details=describe(max_seconds=f"{stream.max_seconds:g}")
        )
    if isinstance(error, SampleRateChanged) and stream is not None:
        return ProtocolError(
            ErrorCode.INVALID_EVENT_DATA,
            "音频数据无效：同一条消息中采样率不能改变",
            session_id=session_id,
            details=describe(field="sample_rate", expected=stream.sample_rate),
        )
    kept = KEPT_FOR_RETRY if finishing else ""
    if isinstance(error, SttTimeout):
        return ProtocolError(ErrorCode.SERVICE_TIMEOUT, f"语音识别超时{kept}", session_id=session_id)
    log.warning("stt failed", extra={"session_id": session_id, "error": str(error)})
    message = f"语音识别出错{kept}" if finishing else None
    return ProtocolError(ErrorCode.STT_SERVICE_ERROR, message, session_id=session_id)


def _check_room(session: Session, field: str, held: int, limit: int, reason: str) -> None:
    """A per-session list (MAX_MESSAGES_PER_SESSION, ...) takes no more items once full."""
    if held >= limit:
        raise ProtocolError(
            ErrorCode.INVALID_EVENT_DATA,
            f"事件数据无效：{reason}",
            session_id=session.session_id,
            details=describe(field=field, limit=limit),
        )


@dataclass(frozen=True, slots=True)
class Services:
    """What every connection of a worker shares."""

    settings: Settings
    sessions: SessionStore
    transcriber: Transcriber
    generations: GenerationManager


class Conversation:
    """Protocol state of one connection: the sessions it owns and their open recordings."""

    def __init__(self, services: Services, send: Send) -> None:
        self.services = services
        self.connection_id = uuid.uuid4().hex
        self._send = send
        settings = services.settings
        self.limits = Limits(
            text_chars=settings.max_text_chars,
            label_chars=settings.max_label_chars,
            list_items=settings.max_list_items,
            history_messages=settings.max_history_messages,
        )
        self.recordings = Recordings()
        # Sessions whose recording is over for the server (its message_start was refused, or the
        # wall-clock limit finished it) while the app may still stream it: those chunks and that
        # message_end are dropped without an error each (one refusal, one snackbar).
        self.dropping: set[str] = set()
        # Frames and wall-clock expiries of this connection run one at a time, as the protocol is sequential.
        self._turn = asyncio.Lock()
        self._handlers: dict[str, Callable[[Any], Awaitable[None]]] = {
            "conversation_start": self.on_conversation_start,
            "heartbeat": self.on_heartbeat,
        }
        self._session_handlers: dict[str, Callable[[Session, Any], Awaitable[None]]] = {
            "message_start": self.on_message_start,
            "audio_stream": self.on_audio_stream,
            "message_end": self.on_message_end,
            "manual_generate": self.on_manual_generate,
            "user_modification": self.on_user_modification,
            "user_selected_response": self.on_user_selected_response,
            "scenario_supplement": self.on_scenario_supplement,
            "response_count_update": self.on_response_count_update,
            "conversation_end": self.on_conversation_end,
        }

    # -- plumbing ---------------------------------------------------------------------------

    async def send(self, event: Event) -> None:
        if event["type"] == "error":
            metrics.ERRORS.labels(event["data"]["error_code"]).inc()
        try:
            await self._send(event)
        except Exception as error:  # the peer went away; the session's state is already recorded
            log.info("send failed", extra={"connection_id": self.connection_id, "error": type(error).__name__})

    async def handle_frame(self, raw: str | bytes) -> None:
        """Handle one client frame; every failure becomes an `error` event."""
        async with self._turn:
            await self._handle_frame(raw)

    async def _handle_frame(self, raw: str | bytes) -> None:
        session_id: str | None = None
        try:
            event_type, data = parse_client_event(raw, self.limits)
            metrics.EVENTS.labels(event_type).inc()
            if isinstance(data, SessionEvent):
                session_id = data.session_id
                session = self.services.sessions.get(data.session_id, self.connection_id)
                await self._session_handlers[event_type](session, data)
            else:
                await self._handlers[event_type](data)
        except ProtocolError as error:
            if error.session_id is None:
                error.session_id = session_id
            await self._report(error)
        except Exception:
            log.exception("internal error", extra={"session_id": session_id, "connection_id": self.connection_id})
            await self.send(error_event(ProtocolError(ErrorCode.INTERNAL_ERROR, session_id=session_id)))

    async def _report(self, error: ProtocolError) -> None:
        log.info(
            "client error",
            extra={"session_id": error.session_id, "error_code": error.code.value, "connection_id": self.connection_id},
        )
        await self.send(error_event(error))

    async def close(self) -> None:
        """The connection is gone: cancel its work, drop its recordings and sessions."""
        async with self._turn:
            for session_id in self.services.sessions.owned_by(self.connection_id):
                await self._end_session(session_id)
            self.services.sessions.forget_owner(self.connection_id)

    async def _end_session(self, session_id: str) -> None:
        self.services.generations.cancel(session_id)
        self.dropping.discard(session_id)
        await self.recordings.abort(session_id)
        self.services.sessions.end(session_id)
        metrics.SESSIONS.dec()

    def _generate(self, kind: Task, session: Session, **context: Any) -> None:
        self.services.generations.start(kind, session.context(**context), self.send, stream=session.stream_suggestions)

    # -- client events ------------------------------------------------------------------------

    async def on_conversation_start(self, data: ConversationStart) -> None:
        limit = self.services.settings.max_sessions_per_connection
        if len(self.services.sessions.owned_by(self.connection_id)) >= limit:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "本连接的会话数已达上限，请先结束不再使用的会话",
                details=describe(limit=limit),
            )
        session = self.services.sessions.create(self.connection_id, data.response_count, data.scenario_description)
        session.partial_transcripts = data.options.partial_transcripts
        session.user_profile = data.user_profile
        session.target_profile = data.target_profile
        session.stream_suggestions = data.options.stream_suggestions
        session.opinion_prediction = (
            data.options.opinion_prediction or self.services.generations.policy.opinion_prediction_for_all
        )
        for message in data.history_messages:
            session.add_message(message.sender, message.content, "history", message.message_id)
        metrics.SESSIONS.inc()
        log.info("session created", extra={"session_id": session.session_id, "connection_id": self.connection_id})
        await self.send(session_created_event(session.session_id))
        if session.has_context:
            self._generate(Task.OPINIONS, session)

    async def on_message_start(self, session: Session, data: MessageStart) -> None:
        self.services.generations.cancel(session.session_id)
        self.dropping.discard(session.session_id)
        previous = self.recordings.get(session.session_id)
        try:
            self._check_room_for_a_recording(session, previous is not None)
        except ProtocolError:
            self.dropping.add(session.session_id)
            raise
        if previous is not None and previous.stream.received_bytes:
            # A second message_start without message_end: the earlier recording is kept, not lost.
            await self._record_transcript(session, previous)
        elif previous is not None:
            await self.recordings.abort(session.session_id)
        on_partial = self._partial_sender(session.session_id) if session.partial_transcripts else None
        try:
            with stt_errors(session.session_id):
                stream = await self.services.transcriber.open_stream(on_partial)
        except ProtocolError:
            self.dropping.add(session.session_id)
            raise
        wall_limit = self.services.settings.recording_wall_limit
        self.recordings.open(session.session_id, data.sender, stream, wall_limit, self._on_wall_limit)
        await self.send(status_update_event(session.session_id, "recording_message"))

    def _check_room_for_a_recording(self, session: Session, replacing: bool) -> None:
        """A session holds at most MAX_MESSAGES_PER_SESSION messages, a connection at most
        MAX_RECORDINGS_PER_CONNECTION open recordings (one client cannot hold the decoders)."""
        settings = self.services.settings
        self._check_message_room(session)
        if not replacing and len(self.recordings) >= settings.max_recordings_per_connection:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "本连接已有正在录制的消息，请先发送 message_end 结束它",
                session_id=session.session_id,
                details=describe(limit=settings.max_recordings_per_connection),
            )

    def _check_message_room(self, session: Session) -> None:
        limit = self.services.settings.max_messages_per_session
        _check_room(session, "messages", len(session.messages), limit, "本会话的消息数已达上限，请开始新的对话")

    async def _on_wall_limit(self, recording: Recording) -> None:
        """The recording stayed open RECORDING_WALL_LIMIT_SECONDS: it is finished and recorded as on message_end."""
        async with self._turn:
            if self.recordings.get(recording.session_id) is not recording:
                return
            log.info("recording wall-clock limit reached", extra={"session_id": recording.session_id})
            try:
                session = self.services.sessions.get(recording.session_id, self.connection_id)
                await self._end_message(session, recording)
            except ProtocolError as error:
                await self._report(error)
                return
            self.dropping.add(session.session_id)

    def _partial_sender(self, session_id: str) -> PartialCallback:
        async def send_partial(text: str) -> None:
            if self.recordings.get(session_id) is not None:
                await self.send(transcript_partial_event(session_id, text))

        return send_partial

    def _open_recording(self, session: Session) -> Recording:
        recording = self.recordings.get(session.session_id)
        if recording is None:
            raise ProtocolError(ErrorCode.NO_ACTIVE_MESSAGE, session_id=session.session_id)
        return recording

    async def on_audio_stream(self, session: Session, data: AudioStream) -> None:
        if session.session_id in self.dropping:
            return
        recording = self._open_recording(session)
        if recording.full:
            return  # AUDIO_TOO_LONG or a full buffer was answered once; the rest of the recording is dropped.
        settings = self.services.settings
        pcm, sample_rate = decode_chunk(data, settings.client_sample_rate, settings.audio_channels)
        with stt_errors(session.session_id, recording.stream):
            try:
                await self.recordings.append(recording, pcm, sample_rate)
            except (AudioTooLong, BufferFull):
                recording.full = True
                raise

    async def on_message_end(self, session: Session, data: MessageEnd) -> None:
        if session.session_id in self.dropping:
            # The refusal was answered at message_start; the app ends the recording it was refused.
            self.dropping.discard(session.session_id)
            return
        await self._end_message(session, self._open_recording(session))

    async def _end_message(self, session: Session, recording: Recording) -> None:
        await self.send(status_update_event(session.session_id, "processing_stt"))
        await self._record_transcript(session, recording)
        await self.send(status_update_event(session.session_id, "generating_opinions"))
        self._generate(Task.OPINIONS, session)

    async def _record_transcript(self, session: Session, recording: Recording) -> None:
        """Finish the open recording and record its text. On failure the recording stays open."""
        with stt_errors(session.session_id, recording.stream, finishing=True):
            text = await self.recordings.finish(recording)
        message = session.add_message(recording.sender, text, "recorded")
        log.info(
            "message recorded",
            extra={
                "session_id": session.session_id,
                "message_id": message.message_id,
                "seconds": recording.stream.seconds,
            },
        )
        await self.send(
            message_recorded_event(session.session_id, message.message_id, text, recording.sender, spoken=True)
        )

    async def on_manual_generate(self, session: Session, data: ManualGenerate) -> None:
        session.last_focus = list(data.focused_message_ids)
        session.last_opinion = data.opinion
        await self._generate_replies(session)

    async def on_user_modification(self, session: Session, data: UserModification) -> None:
        limit = self.services.settings.max_modifications_per_session
        _check_room(session, "modifications", len(session.modifications), limit, "本会话的修改意见数已达上限")
        session.modifications.append(data.modification)
        self.services.generations.context_changed(session.session_id)
        await self._generate_replies(session)

    async def _generate_replies(self, session: Session) -> None:
        await self.send(status_update_event(session.session_id, "generating_response"))
        self._generate(Task.REPLIES, session, focused=tuple(session.last_focus), opinion=session.last_opinion)

    async def on_user_selected_response(self, session: Session, data: UserSelectedResponse) -> None:
        self._check_message_room(session)
        message = session.add_message(data.sender, data.selected_content, "selected")
        self.services.generations.context_changed(session.session_id)
        await self.send(
            message_recorded_event(session.session_id, message.message_id, message.content, data.sender, spoken=False)
        )
        if session.opinion_prediction:
            self._generate(Task.PREDICTION, session)

    async def on_scenario_supplement(self, session: Session, data: ScenarioSupplement) -> None:
        session.scenario_supplement = data.supplement
        self.services.generations.context_changed(session.session_id)

    async def on_response_count_update(self, session: Session, data: ResponseCountUpdate) -> None:
        session.response_count = data.response_count
        self.services.generations.context_changed(session.session_id)

    async def on_conversation_end(self, session: Session, data: ConversationEnd) -> None:
        log.info("session ended", extra={"session_id": session.session_id, "connection_id": self.connection_id})
        await self._end_session(session.session_id)
        await self.send(profile_archive_event(session.session_id, session.user_profile, session.target_profile))

    async def on_heartbeat(self, data: Heartbeat) -> None:
        """Keep-alive from the client: nothing to do, nothing to answer."""
