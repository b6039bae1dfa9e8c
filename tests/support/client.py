"""A protocol client written from PROTOCOL.md: it reads server events strictly in order."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import orjson
import websockets


class ProtocolClient:
    def __init__(self, url: str) -> None:
        self.url = url
        self.ws: Any = None

    async def __aenter__(self) -> ProtocolClient:
        self.ws = await websockets.connect(self.url, max_size=None, open_timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()

    async def send(self, event_type: str, **data: Any) -> None:
        await self.ws.send(orjson.dumps({"type": event_type, "data": data}).decode())

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        return event

    async def expect(self, event_type: str, timeout: float = 10.0, **fields: Any) -> dict[str, Any]:
        """The next event must be `event_type` (and carry `fields`); return its data."""
        event = await self.recv(timeout)
        assert event["type"] == event_type, f"expected {event_type}, got {event}"
        for key, value in fields.items():
            assert event["data"].get(key) == value, f"{key}: expected {value!r}, got {event}"
        data: dict[str, Any] = event["data"]
        return data

    async def expect_status(self, status: str, session_id: str) -> None:
        await self.expect("status_update", status=status, session_id=session_id)

    async def expect_error(self, code: str, timeout: float = 10.0) -> dict[str, Any]:
        data = await self.expect("error", timeout)
        assert data["error_code"] == code, f"expected {code}, got {data}"
        assert data["message"], "error events carry a human-readable message"
        return data

    async def expect_silence(self, seconds: float = 0.5) -> None:
        """Nothing arrives within `seconds`."""
        try:
            event = await asyncio.wait_for(self.ws.recv(), seconds)
        except TimeoutError:
            return
        raise AssertionError(f"expected no event, got {event}")

    async def start_session(self, response_count: int = 3, **data: Any) -> str:
        await self.send("conversation_start", response_count=response_count, **data)
        session_id: str = (await self.expect("session_created"))["session_id"]
        if data.get("history_messages") or data.get("scenario_description"):
            await self.expect("opinion_suggestions", session_id=session_id)
        return session_id

    async def record(
        self, session_id: str, pcm: bytes, chunk_bytes: int = 32000, sender: str = "other", **audio: Any
    ) -> dict[str, Any]:
        """The whole default message sequence; returns the message_recorded data."""
        await self.send("message_start", session_id=session_id, sender=sender)
        await self.expect_status("recording_message", session_id)
        for offset in range(0, len(pcm), chunk_bytes):
            chunk = base64.b64encode(pcm[offset : offset + chunk_bytes]).decode()
            await self.send("audio_stream", session_id=session_id, audio_chunk=chunk, **audio)
        await self.send("message_end", session_id=session_id)
        await self.expect_status("processing_stt", session_id)
        recorded = await self.expect("message_recorded", timeout=60, session_id=session_id, sender=sender)
        await self.expect_status("generating_opinions", session_id)
        await self.expect("opinion_suggestions", session_id=session_id)
        return recorded
