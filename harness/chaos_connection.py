"""A chaos client's WebSocket: a reader task files every event as it arrives (counting errors), and
the scenario `take`s the events it waits for, whatever else the server sent in between."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import websockets

from harness.chaos_events import Frame, event


class Gone(Exception):
    """The connection closed while the scenario still needed it."""


@dataclass
class Tally:
    connections: int = 0
    frames: Counter[str] = field(default_factory=Counter)  # sent, by event type or "invalid:<kind>"
    errors: Counter[str] = field(default_factory=Counter)  # received, by error_code
    closes: Counter[str] = field(default_factory=Counter)  # how connections ended other than by us
    recordings: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    busy_kills: int = 0
    streams_on_killed: int = 0
    pauses: int = 0
    unanswered: int = 0  # bad frames without their one error
    failures: list[str] = field(default_factory=list)


class ChaosConnection:
    """One WebSocket; a reader task files every event, scenarios `take` the ones they wait for."""

    def __init__(self, url: str, tally: Tally) -> None:
        self.url = url
        self.tally = tally
        self.ws: Any = None
        self.inbox: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []
        self.sessions: set[str] = set()
        self.closed = False
        self.dropped = False  # by the scenario: nothing more is sent on it
        self._arrived = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None

    async def open(self) -> None:
        self.ws = await websockets.connect(self.url, max_size=None, open_timeout=30, close_timeout=5)
        self.tally.connections += 1
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                event_ = orjson.loads(raw)
                if event_["type"] == "error":
                    self.tally.errors[event_["data"]["error_code"]] += 1
                    self.errors.append(event_["data"])
                self.inbox.append(event_)
                self._arrived.set()
        except websockets.ConnectionClosed:
            pass
        finally:
            self.closed = True
            self._arrived.set()

    @property
    def close_code(self) -> int | None:
        code: int | None = self.ws.close_code if self.ws is not None else None
        return code

    async def send(self, kind: str, frame: Frame) -> None:
        if self.closed:
            raise Gone(f"closed ({self.close_code}) before {kind}")
        try:
            await self.ws.send(frame)
        except websockets.ConnectionClosed:
            raise Gone(f"closed ({self.close_code}) while sending {kind}") from None
        self.tally.frames[kind] += 1

    async def send_event(self, event_type: str, **data: Any) -> None:
        await self.send(event_type, event(event_type, **data))

    async def take(self, matches: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """Remove and return the first event (already arrived or arriving) that `matches`."""
        deadline = time.monotonic() + timeout
        while True:
            for index, candidate in enumerate(self.inbox):
                if matches(candidate):
                    return self.inbox.pop(index)
            if self.closed:
                raise Gone(f"closed ({self.close_code}) while waiting")
            self._arrived.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), remaining)

    async def drop(self) -> None:
        """Vanish as a phone losing its network does: no close handshake."""
        self.dropped = True
        self.ws.transport.abort()
        await self.close()

    async def close(self) -> None:
        if self.ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ws.close(), 5)
        if self._reader is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._reader, 5)


def for_session(session_id: str, event_type: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    def matches(candidate: dict[str, Any]) -> bool:
        data = candidate["data"]
        return (
            candidate["type"] == event_type
            and data.get("session_id") == session_id
            and all(data.get(key) == value for key, value in fields.items())
        )

    return matches


def either(*tests: Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
    return lambda candidate: any(test(candidate) for test in tests)
