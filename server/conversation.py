"""The `/conversation` state machine for one WebSocket connection.

One handler per client event, each reading like its sequence in PROTOCOL.md. The dispatcher
validates the frame, resolves the session (only sessions attached to this connection) and turns
every `ProtocolError` into one `error` event; the connection stays open whatever the client sends.
The handler does not know how audio reaches Vosk: it talks to a `Transcriber`.

Sessions live in the session store (server/store): a change is written there, then applied to the
worker's cached `SessionState`, then confirmed. A dropped connection detaches its sessions (an open
recording is finished, its `message_recorded` queued for the next holder); `session_resume`
attaches them again on any worker or instance; a takeover silences the connection that lost them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential

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
    SessionResume,
    UserModification,
    UserSelectedResponse,
    describe,
    error_event,
    message_recorded_event,
    parse_client_event,
    profile_archive_event,
    session_created_event,
    session_restored_event,
    status_update_event,
    transcript_partial_event,
)
from server.recordings import Recording, Recordings
from server.sessions import AttachedSessions, Held, generation_context
from server.store import (
    Attachment,
    SessionExpired,
    SessionNotFound,
    SessionState,
    SessionStore,
    SessionTakenOver,
    StoredMessage,
    StoreError,
    StoreUnavailable,
)
from stt_pool.errors import AudioTooLong, BufferFull, SampleRateChanged, SttError, SttOverloaded, SttTimeout
from stt_pool.interface import PartialCallback, Transcriber, TranscriptStream

log = logging.getLogger("server.conversation")
KEPT_FOR_RETRY = "，录音已保留，请重新发送 message_end"
TRANSCRIPT_KEPT = "会话保存失败，识别结果已保留，请重新发送 message_end"
# A recording cut by a drop is recorded for the next holder: a store that fails is tried again this often.
DROP_RECORD_ATTEMPTS = 4
STORE_FAILED = "会话保存失败，此操作未生效，请稍后重试"
# An attached session counts as active at least this often (seconds), however quiet the app is.
TOUCH_INTERVAL = 60.0


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


def _check_room(session: SessionState, field: str, held: int, limit: int, reason: str) -> None:
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
    store: SessionStore
    sessions: AttachedSessions
    transcriber: Transcriber
    generations: GenerationManager


class Conversation:
    """Protocol state of one connection: the sessions it holds and their open recordings."""

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
        # The sessions this connection ended, newest last, so that their ids answer SESSION_EXPIRED
        # here (a resume asks the store); bounded, so a long connection holds no growing list.
        self.ended: deque[str] = deque(maxlen=settings.max_ended_sessions_per_connection)
        # Sessions another connection took over from this one: their frames here are ignored, as
        # this connection gets no further events of them (bounded the same way).
        self.lost: deque[str] = deque(maxlen=settings.max_ended_sessions_per_connection)
        # Set once the connection started or resumed a session: from then on quiet is not idle.
        self.holds_sessions = asyncio.Event()
        # Frames and wall-clock expiries of this connection run one at a time, as the protocol is sequential.
        self._turn = asyncio.Lock()
        self._touch_every = min(TOUCH_INTERVAL, settings.session_resume_window / 4)
        self._handlers: dict[str, Callable[[Any], Awaitable[None]]] = {
            "conversation_start": self.on_conversation_start,
            "session_resume": self.on_session_resume,
            "heartbeat": self.on_heartbeat,
        }
        self._session_handlers: dict[str, Callable[[SessionState, Any], Awaitable[None]]] = {
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

    @property
    def store(self) -> SessionStore:
        return self.services.store

    async def send(self, event: Event) -> None:
        if event["type"] == "error":
            metrics.ERRORS.labels(event["data"]["error_code"]).inc()
        try:
            await self._send(event)
        except Exception as error:  # the peer went away; the session's state is already recorded
            log.info("send failed", extra={"connection_id": self.connection_id, "error": type(error).__name__})

    def _session_sender(self, held: Held) -> Send:
        """How the session's work (generations, partial captions) reaches the client: not at all once
        another connection took the session over."""

        async def send(event: Event) -> None:
            if not held.attachment.taken_over.is_set():
                await self.send(event)

        return send

    async def _confirm(self, held: Held, event: Event) -> None:
        """Send an event confirming a change already in the store; if another connection took the
        session over meanwhile, the event is queued for that holder instead (nothing confirmed is lost)."""
        if not held.attachment.taken_over.is_set():
            await self.send(event)
            return
        with contextlib.suppress(StoreError):
            await self.store.enqueue_event(held.session_id, event)

    async def handle_frame(self, raw: str | bytes) -> None:
        """Handle one client frame; every failure becomes an `error` event."""
        async with self._turn:
            await self._handle_frame(raw)

    async def _handle_frame(self, raw: str | bytes) -> None:
        session_id: str | None = None
        try:
            event_type, data = parse_client_event(raw, self.limits)
            metrics.EVENTS.labels(event_type).inc()
            if isinstance(data, SessionEvent) and event_type in self._session_handlers:
                session_id = data.session_id
                session = await self._session(data.session_id)
                if session is not None:
                    await self._session_handlers[event_type](session, data)
            else:
                session_id = data.session_id if isinstance(data, SessionEvent) else None
                await self._handlers[event_type](data)
        except ProtocolError as error:
            if error.session_id is None:
                error.session_id = session_id
            await self._report(error)
        except StoreUnavailable as error:
            log.error("session store unavailable", extra={"session_id": session_id, "error": str(error)})
            await self.send(error_event(ProtocolError(ErrorCode.INTERNAL_ERROR, STORE_FAILED, session_id=session_id)))
        except Exception:
            log.exception("internal error", extra={"session_id": session_id, "connection_id": self.connection_id})
            await self.send(error_event(ProtocolError(ErrorCode.INTERNAL_ERROR, session_id=session_id)))

    async def _session(self, session_id: str) -> SessionState | None:
        """The session this connection holds; None (the frame is ignored) if it was taken over from it."""
        held = self.services.sessions.held(session_id, self.connection_id)
        if held is not None and held.attachment.taken_over.is_set():
            await self._lose(held)
        if session_id in self.lost:
            return None
        if held is None:
            # Whether the session exists elsewhere is not told: another connection must resume it first.
            code = ErrorCode.SESSION_EXPIRED if session_id in self.ended else ErrorCode.SESSION_NOT_FOUND
            raise ProtocolError(code, session_id=session_id)
        return held.session

    @contextmanager
    def _stored(self, held: Held) -> Iterator[None]:
        """A store write for `held`: a session the store no longer has is forgotten and reported."""
        try:
            yield
        except SessionExpired:
            self._forget(held)
            raise ProtocolError(ErrorCode.SESSION_EXPIRED, session_id=held.session_id) from None
        except SessionNotFound:
            self._forget(held)
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, session_id=held.session_id) from None

    def _held(self, session: SessionState) -> Held:
        held = self.services.sessions.held(session.session_id, self.connection_id)
        if held is None or held.session is not session:
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, session_id=session.session_id)
        return held

    async def _report(self, error: ProtocolError) -> None:
        log.info(
            "client error",
            extra={"session_id": error.session_id, "error_code": error.code.value, "connection_id": self.connection_id},
        )
        await self.send(error_event(error))

    # -- holding sessions -------------------------------------------------------------------

    def _hold(self, session: SessionState, attachment: Attachment) -> Held:
        held = self.services.sessions.hold(self.connection_id, session, attachment)
        held.pump = asyncio.create_task(self._pump(held), name=f"session-pump:{session.session_id}")
        metrics.SESSIONS.inc()
        self.holds_sessions.set()
        return held

    def _forget(self, held: Held) -> bool:
        """Stop serving `held` here: its generations, its pump, its place in the cache (once)."""
        if not self.services.sessions.release(held):
            return False
        metrics.SESSIONS.dec()
        # Generations are kept per session in the worker: a new holder here (a takeover within the
        # worker) may already run its own, which are not this connection's to cancel.
        if not self.services.sessions.held_by_another(held.session_id, self.connection_id):
            self.services.generations.cancel(held.session_id)
        self.dropping.discard(held.session_id)
        if held.pump is not None and held.pump is not asyncio.current_task():
            held.pump.cancel()
        return True

    async def _pump(self, held: Held) -> None:
        """Deliver events queued for this holder, notice a takeover, and keep an attached session from
        expiring while the app is quiet (reading, listening)."""
        attachment = held.attachment
        while True:
            waits = [
                asyncio.ensure_future(attachment.events_waiting.wait()),
                asyncio.ensure_future(attachment.taken_over.wait()),
            ]
            try:
                done, _ = await asyncio.wait(waits, timeout=self._touch_every, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for wait in waits:
                    wait.cancel()
            async with self._turn:
                if self.services.sessions.held(held.session_id, self.connection_id) is not held:
                    return
                try:
                    if attachment.taken_over.is_set():
                        await self._lose(held)
                        return
                    with self._stored(held):
                        if done:
                            await self._deliver_queued(held)
                        else:
                            await self.store.touch(held.session_id)
                except SessionTakenOver:
                    await self._lose(held)
                    return
                except ProtocolError as error:
                    await self._report(error)
                    return
                except StoreUnavailable as error:
                    log.warning("session store unavailable", extra={"session_id": held.session_id, "error": str(error)})

    async def _deliver_queued(self, held: Held) -> None:
        events = await self.store.drain_events(held.attachment)
        cached = {message.message_id for message in held.session.messages}
        if any(e["type"] == "message_recorded" and e["data"].get("message_id") not in cached for e in events):
            # A message another connection recorded (at its drop or takeover) joins the cache from the store.
            state = await self.store.load(held.session_id)
            held.session.messages = state.messages
        for event in events:
            await self.send(event)

    async def _lose(self, held: Held) -> None:
        """Another connection took the session over: nothing more of it is sent here. An open
        recording is finished and recorded for the new holder, as on a drop."""
        if not self._forget(held):
            return
        self.lost.append(held.session_id)
        metrics.SESSION_TAKEOVERS.inc()
        log.info("session taken over", extra={"session_id": held.session_id, "connection_id": self.connection_id})
        await self._record_for_later(held)

    async def _record_for_later(self, held: Held) -> None:
        """Finish the session's open recording (if it has audio) and queue its `message_recorded` for
        whoever holds the session next; without audio the recording is dropped."""
        recording = self.recordings.get(held.session_id)
        if recording is None:
            return
        if not recording.stream.received_bytes:
            await self.recordings.abort(held.session_id)
            return
        try:
            text = await self.recordings.transcribe(recording)
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(StoreUnavailable),
                stop=stop_after_attempt(DROP_RECORD_ATTEMPTS),
                wait=wait_exponential(multiplier=0.5),
                reraise=True,
            ):
                with attempt:
                    message = await self.store.append_message(
                        held.session_id, sender=recording.sender, content=text, origin="recorded"
                    )
            self.recordings.close(recording)
            event = message_recorded_event(held.session_id, message.message_id, text, recording.sender, spoken=True)
            await self.store.enqueue_event(held.session_id, event)
        except (SttError, StoreError) as error:
            log.error(
                "recording cut by a drop could not be recorded",
                extra={"session_id": held.session_id, "error": type(error).__name__},
            )
            await self.recordings.abort(held.session_id)
            return
        log.info(
            "message recorded for a detached session",
            extra={
                "session_id": held.session_id,
                "message_id": message.message_id,
                "seconds": recording.stream.seconds,
            },
        )

    async def close(self) -> None:
        """The connection is gone (or the worker stops): every session it held stays resumable. Generations
        are cancelled, the session is detached first (so what follows is queued for the next holder), and
        an open recording is finished and recorded."""
        # Pumps are cancelled (by _forget) only under the turn: one delivering events is never cut between
        # taking them from the store and sending them.
        async with self._turn:
            for held in self.services.sessions.owned_by(self.connection_id):
                self._forget(held)
                with contextlib.suppress(StoreError):
                    if await self.store.detach(held.attachment):
                        metrics.SESSION_DETACHES.inc()
                await self._record_for_later(held)

    def _generate(self, kind: Task, session: SessionState, **context: Any) -> None:
        send = self._session_sender(self._held(session))
        self.services.generations.start(
            kind, generation_context(session, **context), send, stream=session.stream_suggestions
        )

    # -- client events ------------------------------------------------------------------------

    def _check_session_room(self) -> None:
        limit = self.services.settings.max_sessions_per_connection
        if len(self.services.sessions.owned_by(self.connection_id)) >= limit:
            raise ProtocolError(
                ErrorCode.RATE_LIMITED,
                "本连接的会话数已达上限，请先结束不再使用的会话",
                details=describe(limit=limit),
            )

    async def on_conversation_start(self, data: ConversationStart) -> None:
        self._check_session_room()
        options = data.options
        session = SessionState(
            session_id=str(uuid.uuid4()),
            response_count=data.response_count,
            scenario_description=data.scenario_description,
            messages=[StoredMessage(m.message_id, m.sender, m.content, "history") for m in data.history_messages],
            options={
                "partial_transcripts": options.partial_transcripts,
                "stream_suggestions": options.stream_suggestions,
                "opinion_prediction": (
                    options.opinion_prediction or self.services.generations.policy.opinion_prediction_for_all
                ),
            },
            user_profile=data.user_profile.given() if data.user_profile else None,
            target_profile=data.target_profile.given() if data.target_profile else None,
        )
        attachment = await self.store.create(session, self.connection_id)
        self._hold(session, attachment)
        log.info("session created", extra={"session_id": session.session_id, "connection_id": self.connection_id})
        await self.send(session_created_event(session.session_id))
        if session.has_context:
            self._generate(Task.OPINIONS, session)

    async def on_session_resume(self, data: SessionResume) -> None:
        """Attach this connection to a stored session (taking it over from any other connection), then
        send `session_restored` and every event queued while it was detached, in order."""
        session_id = data.session_id
        held = self.services.sessions.held(session_id, self.connection_id)
        if held is None:
            self._check_session_room()
        try:
            attachment = await self.store.attach(session_id, self.connection_id)
            state = await self.store.load(session_id)
        except SessionNotFound:
            metrics.SESSION_RESUMES.labels("not_found").inc()
            raise ProtocolError(ErrorCode.SESSION_NOT_FOUND, session_id=session_id) from None
        except SessionExpired:
            metrics.SESSION_RESUMES.labels("expired").inc()
            raise ProtocolError(ErrorCode.SESSION_EXPIRED, session_id=session_id) from None
        if held is not None:
            # The same connection resuming again: its earlier hold gives way to the new one.
            self._forget(held)
        # Whatever this worker still generates for the session was for the connection that lost it.
        self.services.generations.cancel(session_id)
        with contextlib.suppress(ValueError):
            self.lost.remove(session_id)
        held = self._hold(state, attachment)
        metrics.SESSION_RESUMES.labels("restored").inc()
        log.info("session resumed", extra={"session_id": session_id, "connection_id": self.connection_id})
        await self.send(
            session_restored_event(
                session_id,
                message_count=len(state.messages),
                response_count=state.response_count,
                has_modifications=bool(state.modifications),
                scenario_description=state.scenario_description,
            )
        )
        try:
            await self._deliver_queued(held)
        except SessionTakenOver:
            await self._lose(held)

    async def on_message_start(self, session: SessionState, data: MessageStart) -> None:
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
        on_partial = self._partial_sender(session) if session.partial_transcripts else None
        try:
            with stt_errors(session.session_id):
                stream = await self.services.transcriber.open_stream(on_partial)
        except ProtocolError:
            self.dropping.add(session.session_id)
            raise
        wall_limit = self.services.settings.recording_wall_limit
        self.recordings.open(session.session_id, data.sender, stream, wall_limit, self._on_wall_limit)
        await self.send(status_update_event(session.session_id, "recording_message"))
        await self._touch_now_and_then(session.session_id)

    async def _touch_now_and_then(self, session_id: str) -> None:
        """Activity that writes nothing (a recording under way) still counts, at most once a TOUCH_INTERVAL."""
        held = self.services.sessions.held(session_id, self.connection_id)
        now = time.monotonic()
        if held is None or now - held.touched < self._touch_every:
            return
        held.touched = now
        with self._stored(held):
            await self.store.touch(session_id)

    def _check_room_for_a_recording(self, session: SessionState, replacing: bool) -> None:
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

    def _check_message_room(self, session: SessionState) -> None:
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
            except StoreUnavailable as error:
                log.error("session store unavailable", extra={"session_id": recording.session_id, "error": str(error)})
                await self._report(
                    ProtocolError(ErrorCode.INTERNAL_ERROR, STORE_FAILED, session_id=recording.session_id)
                )
                return
            self.dropping.add(session.session_id)

    def _partial_sender(self, session: SessionState) -> PartialCallback:
        send = self._session_sender(self._held(session))
        session_id = session.session_id

        async def send_partial(text: str) -> None:
            if self.recordings.get(session_id) is not None:
                await send(transcript_partial_event(session_id, text))

        return send_partial

    def _open_recording(self, session: SessionState) -> Recording:
        recording = self.recordings.get(session.session_id)
        if recording is None:
            raise ProtocolError(ErrorCode.NO_ACTIVE_MESSAGE, session_id=session.session_id)
        return recording

    async def on_audio_stream(self, session: SessionState, data: AudioStream) -> None:
        if session.session_id in self.dropping:
            return
        recording = self._open_recording(session)
        if recording.full or recording.transcript is not None:
            # AUDIO_TOO_LONG or a full buffer was answered once, or the message already ended (its text
            # waits for the store): the rest of the recording is dropped.
            return
        settings = self.services.settings
        chunk = decode_chunk(data, settings.client_sample_rate, settings.audio_channels)
        with stt_errors(session.session_id, recording.stream):
            try:
                await self.recordings.append(recording, chunk)
            except (AudioTooLong, BufferFull):
                recording.full = True
                raise
        await self._touch_now_and_then(session.session_id)

    async def on_message_end(self, session: SessionState, data: MessageEnd) -> None:
        if session.session_id in self.dropping:
            # The refusal was answered at message_start; the app ends the recording it was refused.
            self.dropping.discard(session.session_id)
            return
        await self._end_message(session, self._open_recording(session))

    async def _end_message(self, session: SessionState, recording: Recording) -> None:
        await self.send(status_update_event(session.session_id, "processing_stt"))
        await self._record_transcript(session, recording)
        await self.send(status_update_event(session.session_id, "generating_opinions"))
        self._generate(Task.OPINIONS, session)

    async def _record_transcript(self, session: SessionState, recording: Recording) -> None:
        """Finish the open recording and record its text. On failure the recording stays open (with its
        text, if the store is what failed), for the `message_end` that the error asks for."""
        held = self._held(session)
        with stt_errors(session.session_id, recording.stream, finishing=True):
            text = await self.recordings.transcribe(recording)
        try:
            with self._stored(held):
                stored = await self.store.append_message(
                    session.session_id, sender=recording.sender, content=text, origin="recorded"
                )
        except StoreUnavailable as error:
            log.error("session store unavailable", extra={"session_id": session.session_id, "error": str(error)})
            raise ProtocolError(ErrorCode.INTERNAL_ERROR, TRANSCRIPT_KEPT, session_id=session.session_id) from None
        self.recordings.close(recording)
        session.messages.append(stored)
        log.info(
            "message recorded",
            extra={
                "session_id": session.session_id,
                "message_id": stored.message_id,
                "seconds": recording.stream.seconds,
            },
        )
        await self._confirm(
            held, message_recorded_event(session.session_id, stored.message_id, text, recording.sender, spoken=True)
        )

    async def on_manual_generate(self, session: SessionState, data: ManualGenerate) -> None:
        focus, opinion = list(data.focused_message_ids), data.opinion
        with self._stored(self._held(session)):
            await self.store.update_fields(session.session_id, last_focus=focus, last_opinion=opinion)
        session.last_focus, session.last_opinion = focus, opinion
        await self._generate_replies(session)

    async def on_user_modification(self, session: SessionState, data: UserModification) -> None:
        limit = self.services.settings.max_modifications_per_session
        _check_room(session, "modifications", len(session.modifications), limit, "本会话的修改意见数已达上限")
        with self._stored(self._held(session)):
            await self.store.append_modification(session.session_id, data.modification)
        session.modifications.append(data.modification)
        self.services.generations.context_changed(session.session_id)
        await self._generate_replies(session)

    async def _generate_replies(self, session: SessionState) -> None:
        await self.send(status_update_event(session.session_id, "generating_response"))
        self._generate(Task.REPLIES, session, focused=tuple(session.last_focus), opinion=session.last_opinion)

    async def on_user_selected_response(self, session: SessionState, data: UserSelectedResponse) -> None:
        self._check_message_room(session)
        held = self._held(session)
        with self._stored(held):
            stored = await self.store.append_message(
                session.session_id, sender=data.sender, content=data.selected_content, origin="selected"
            )
        session.messages.append(stored)
        self.services.generations.context_changed(session.session_id)
        await self._confirm(
            held,
            message_recorded_event(session.session_id, stored.message_id, stored.content, data.sender, spoken=False),
        )
        if session.opinion_prediction:
            self._generate(Task.PREDICTION, session)

    async def on_scenario_supplement(self, session: SessionState, data: ScenarioSupplement) -> None:
        with self._stored(self._held(session)):
            await self.store.update_fields(session.session_id, scenario_supplement=data.supplement)
        session.scenario_supplement = data.supplement
        self.services.generations.context_changed(session.session_id)

    async def on_response_count_update(self, session: SessionState, data: ResponseCountUpdate) -> None:
        with self._stored(self._held(session)):
            await self.store.update_fields(session.session_id, response_count=data.response_count)
        session.response_count = data.response_count
        self.services.generations.context_changed(session.session_id)

    async def on_conversation_end(self, session: SessionState, data: ConversationEnd) -> None:
        held = self._held(session)
        log.info("session ended", extra={"session_id": session.session_id, "connection_id": self.connection_id})
        self._forget(held)
        self.ended.append(session.session_id)
        await self.recordings.abort(session.session_id)
        # Deleted before profile_archive confirms the end: the app may close the socket on reading it.
        with contextlib.suppress(SessionExpired, SessionNotFound):
            await self.store.delete(session.session_id)
        await self.send(profile_archive_event(session.session_id, session.user_profile, session.target_profile))

    async def on_heartbeat(self, data: Heartbeat) -> None:
        """Keep-alive from the client: nothing to do, nothing to answer."""
