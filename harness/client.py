"""Protocol clients written from PROTOCOL.md: they read server events strictly in order.

`EventClient` holds every helper the tests and benchmarks use (expect an event, record a message,
...); `ProtocolClient` speaks them over a real WebSocket. Tests that need no network drive the
same helpers in-process (tests/support/inprocess.py).
"""

from __future__ import annotations

import asyncio
import base64
import re
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Any

import orjson
import websockets

CHINESE = re.compile(r"[\u4e00-\u9fff]")
STATUS_FIELDS = {"session_id", "status", "message"}
SUGGESTION_FIELDS = {"session_id", "suggestions", "request_id"}
ERROR_FIELDS = {"session_id", "error_code", "message", "details"}
RESTORED_FIELDS = {
    "session_id",
    "status",
    "message_count",
    "response_count",
    "has_modifications",
    "restored_at",
    "scenario_description",
}
ANY_SESSION = "<any>"


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


def details_of(error: dict[str, Any]) -> dict[str, str]:
    """An error's `details` string (`name: value; ...`) as a dict, for assertions."""
    pairs = (item.split(": ", 1) for item in error.get("details", "").split("; ") if item)
    return {name: value for name, value in pairs}


class EventClient(ABC):
    @abstractmethod
    async def send_raw(self, frame: str | bytes) -> None: ...

    @abstractmethod
    async def recv_raw(self, timeout: float) -> str | bytes: ...

    async def send(self, event_type: str, **data: Any) -> None:
        await self.send_raw(orjson.dumps({"type": event_type, "data": data}).decode())

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(await self.recv_raw(timeout))
        return event

    async def expect(
        self, event_type: str, timeout: float = 10.0, keys: set[str] | None = None, **fields: Any
    ) -> dict[str, Any]:
        """The next event must be `event_type`, carry `fields` (and exactly `keys`, if given); return its data."""
        event = await self.recv(timeout)
        assert event["type"] == event_type, f"expected {event_type}, got {event}"
        data: dict[str, Any] = event["data"]
        if keys is not None:
            assert set(data) == keys, f"expected fields {sorted(keys)}, got {event}"
        for key, value in fields.items():
            assert data.get(key) == value, f"{key}: expected {value!r}, got {event}"
        return data

    async def expect_status(self, status: str, session_id: str, timeout: float = 10.0) -> dict[str, Any]:
        data = await self.expect("status_update", timeout, keys=STATUS_FIELDS, status=status, session_id=session_id)
        assert CHINESE.search(data["message"]), f"status messages are Chinese: {data}"
        return data

    async def expect_suggestions(
        self, event_type: str, session_id: str, count: int | None = None, timeout: float = 10.0
    ) -> dict[str, Any]:
        data = await self.expect(event_type, timeout, keys=SUGGESTION_FIELDS, session_id=session_id)
        assert isinstance(data["request_id"], str) and data["request_id"], data
        assert all(isinstance(text, str) and text for text in data["suggestions"]), data
        if count is not None:
            assert len(data["suggestions"]) == count, data
        else:
            assert 3 <= len(data["suggestions"]) <= 5, data
        return data

    async def expect_recorded(
        self,
        session_id: str,
        message_id: str | None = None,
        sender: str | None = None,
        *,
        spoken: bool,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """A `message_recorded`: `content`+`sender` always, `message_content` only for a spoken message."""
        keys = {"session_id", "message_id", "content", "sender"} | ({"message_content"} if spoken else set())
        data = await self.expect("message_recorded", timeout, keys=keys, session_id=session_id)
        assert isinstance(data["content"], str) and isinstance(data["message_id"], str), data
        if spoken:
            assert data["message_content"] == data["content"], data
        if message_id is not None:
            assert data["message_id"] == message_id, data
        if sender is not None:
            assert data["sender"] == sender, data
        return data

    async def expect_error(
        self, code: str, session_id: str | None = ANY_SESSION, timeout: float = 10.0
    ) -> dict[str, Any]:
        """One `error` with `code`, a Chinese message, `details` a string or absent, and the session's id if given."""
        data = await self.expect("error", timeout)
        assert data["error_code"] == code, f"expected {code}, got {data}"
        assert set(data) <= ERROR_FIELDS, data
        assert isinstance(data["message"], str) and CHINESE.search(data["message"]), data
        assert isinstance(data.get("details", ""), str), f"details is a string or absent: {data}"
        if session_id != ANY_SESSION:
            assert data.get("session_id") == session_id, data
        return data

    async def expect_silence(self, seconds: float = 0.5) -> None:
        """Nothing arrives within `seconds`."""
        try:
            event = await self.recv_raw(seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no event, got {event!r}")

    async def create_session(self, response_count: int = 3, **data: Any) -> str:
        """conversation_start up to `session_created`; returns the session id."""
        await self.send("conversation_start", response_count=response_count, **data)
        session_id: str = (await self.expect("session_created", keys={"session_id"}))["session_id"]
        return session_id

    async def start_session(self, response_count: int = 3, **data: Any) -> str:
        """conversation_start and its whole default sequence; returns the session id."""
        session_id = await self.create_session(response_count, **data)
        if data.get("history_messages") or data.get("scenario_description"):
            await self.expect_suggestions("opinion_suggestions", session_id)
        return session_id

    async def open_recording(self, session_id: str, sender: str = "对方") -> None:
        await self.send("message_start", session_id=session_id, sender=sender)
        await self.expect_status("recording_message", session_id)

    async def send_audio(self, session_id: str, pcm: bytes, chunk_bytes: int = 32000, **audio: Any) -> None:
        for offset in range(0, len(pcm), chunk_bytes):
            await self.send(
                "audio_stream", session_id=session_id, audio_chunk=b64(pcm[offset : offset + chunk_bytes]), **audio
            )

    async def finish_recording(
        self, session_id: str, message_id: str | None = None, sender: str | None = None, timeout: float = 60.0
    ) -> dict[str, Any]:
        """message_end and its whole default sequence; returns the message_recorded data."""
        await self.send("message_end", session_id=session_id)
        await self.expect_status("processing_stt", session_id)
        recorded = await self.expect_recorded(session_id, message_id, sender, spoken=True, timeout=timeout)
        await self.expect_status("generating_opinions", session_id)
        await self.expect_suggestions("opinion_suggestions", session_id, timeout=timeout)
        return recorded

    async def record(
        self,
        session_id: str,
        pcm: bytes,
        message_id: str | None = None,
        sender: str = "对方",
        chunk_bytes: int = 32000,
        **audio: Any,
    ) -> dict[str, Any]:
        """The whole default message sequence; returns the message_recorded data."""
        await self.open_recording(session_id, sender)
        await self.send_audio(session_id, pcm, chunk_bytes, **audio)
        return await self.finish_recording(session_id, message_id, sender)

    async def select(self, session_id: str, content: str, sender: str = "我") -> dict[str, Any]:
        await self.send("user_selected_response", session_id=session_id, selected_content=content, sender=sender)
        return await self.expect_recorded(session_id, sender=sender, spoken=False)

    async def generate_replies(
        self, session_id: str, count: int, event: str = "manual_generate", timeout: float = 10.0, **data: Any
    ) -> dict[str, Any]:
        await self.send(event, session_id=session_id, **data)
        await self.expect_status("generating_response", session_id)
        return await self.expect_suggestions("llm_response", session_id, count, timeout)

    async def end_session(self, session_id: str) -> dict[str, Any]:
        """conversation_end; returns the `profile_archive` that answers it."""
        await self.send("conversation_end", session_id=session_id)
        return await self.expect(
            "profile_archive", keys={"session_id", "user_profile", "target_profile"}, session_id=session_id
        )

    async def resume(self, session_id: str, timeout: float = 10.0) -> dict[str, Any]:
        """session_resume up to `session_restored`, with each field of the type the current app casts it to."""
        await self.send("session_resume", session_id=session_id)
        data = await self.expect("session_restored", timeout, keys=RESTORED_FIELDS, session_id=session_id)
        assert isinstance(data["status"], str), data
        for field in ("message_count", "response_count"):
            assert isinstance(data[field], int) and not isinstance(data[field], bool), data
        assert isinstance(data["has_modifications"], bool), data
        assert datetime.fromisoformat(data["restored_at"]).tzinfo is not None, data
        assert data["scenario_description"] is None or isinstance(data["scenario_description"], str), data
        return data

    async def still_works(self, session_id: str) -> None:
        """A valid request right after an error gets its normal answer, and nothing else came first."""
        recorded = await self.select(session_id, "好的")
        assert recorded["content"] == "好的"
        assert re.fullmatch(r"usr_\d{3}", recorded["message_id"]), recorded


class ProtocolClient(EventClient):
    """The helpers over a real WebSocket: `async with ProtocolClient(server.ws_url) as client:`."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: Any = None

    async def __aenter__(self) -> ProtocolClient:
        self.ws = await websockets.connect(self.url, max_size=None, open_timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def recv_raw(self, timeout: float) -> str | bytes:
        frame: str | bytes = await asyncio.wait_for(self.ws.recv(), timeout)
        return frame

    @property
    def local_port(self) -> int:
        """This end's TCP port (`ServerProcess.serving_pid` finds the worker holding the other end)."""
        return int(self.ws.local_address[1])

    def drop(self) -> None:
        """Lose the connection as a phone on a bad network does: a TCP reset, no closing handshake."""
        self.ws.transport.abort()

    async def close_code(self, timeout: float = 30.0) -> int | None:
        """Read until the server closes the connection (failing on any event first); its close code."""
        try:
            event = await self.recv_raw(timeout)
        except websockets.ConnectionClosed as closed:
            return closed.rcvd.code if closed.rcvd is not None else None
        raise AssertionError(f"expected the connection to close, got {event!r}")
