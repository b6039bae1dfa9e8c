"""The protocol logic without a network: `Conversation` driven directly, its events collected in order.

`InProcessClient` has every helper of the WebSocket client (harness/client.py), so a test reads
the same either way; frames go straight to `Conversation.handle_frame` and what the connection
would send lands in a queue. Engines are the real mock transcriber and mock provider, or the
scriptable `FakeTranscriber` for the transcriber's failures.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

from config import Settings
from harness.client import EventClient
from llm.mock import MockProvider
from server.conversation import Conversation, Services
from server.generation import GenerationManager
from server.protocol import Event, encode
from server.sessions import AttachedSessions
from server.store import SessionStore
from server.store.sqlite_store import SqliteSessionStore
from stt_pool.errors import BufferFull, SttError, SttOverloaded
from stt_pool.interface import PartialCallback, Transcriber, TranscriptStream
from stt_pool.mock import MockTranscriber


class FakeTranscriber(MockTranscriber):
    """The mock transcriber, plus failures queued by the test (`refuse` for opens, `fail_finish` for
    finishes), an optional capacity (beyond `capacity` open streams, opens are SttOverloaded) and
    an optional buffer size (a stream refuses PCM beyond `buffer_bytes` with BufferFull). `stored` has
    the PCM each stream was handed, exactly as the decoder would get it."""

    def __init__(self, sample_rate: int, max_seconds: float, capacity: int | None = None) -> None:
        super().__init__(sample_rate, max_seconds)
        self.refusals: deque[SttError] = deque()
        self.finish_failures: deque[SttError] = deque()
        self.capacity = capacity
        self.open_streams = 0
        self.buffer_bytes: int | None = None
        # The PCM each stream stored, one entry per opened stream in the order they were opened.
        self.stored: list[bytearray] = []

    def refuse(self, error: SttError, times: int = 1) -> None:
        self.refusals.extend([error] * times)

    def fail_finish(self, error: SttError) -> None:
        self.finish_failures.append(error)

    async def open_stream(self, on_partial: PartialCallback | None = None) -> TranscriptStream:
        if self.refusals:
            raise self.refusals.popleft()
        if self.capacity is not None and self.open_streams >= self.capacity:
            raise SttOverloaded("every decoder is busy")
        stream = await super().open_stream(on_partial)
        finish, abort, store = stream.finish, stream.abort, stream._store
        self.open_streams += 1
        stored = bytearray()
        self.stored.append(stored)

        async def store_or_refuse(pcm: bytes) -> None:
            if self.buffer_bytes is not None and stream.received_bytes + len(pcm) > self.buffer_bytes:
                raise BufferFull("no space for the audio buffer")
            await store(pcm)
            stored.extend(pcm)

        async def finish_or_fail() -> str:
            if self.finish_failures:
                raise self.finish_failures.popleft()
            text = await finish()
            self.open_streams -= 1
            return text

        async def release() -> None:
            await abort()
            self.open_streams -= 1

        stream.finish = finish_or_fail  # type: ignore[method-assign]
        stream.abort = release  # type: ignore[method-assign]
        stream._store = store_or_refuse  # type: ignore[method-assign]
        return stream


def settings_with(**values: Any) -> Settings:
    """Settings with the defaults a fresh install has, changed by `values` (no environment, no .env)."""
    return Settings(_env_file=None, **values)


def build_services(
    settings: Settings | None = None,
    transcriber: Transcriber | None = None,
    llm_delay: float = 0.0,
    store: SessionStore | None = None,
) -> Services:
    """Services as a worker has them; the session store is a real SQLite store in a fresh temporary
    directory (unless `store` is given), opened by the first connection and closed after the test."""
    settings = settings or settings_with()
    if store is None:
        state_dir = tempfile.mkdtemp(prefix="adb-inprocess-state-")
        store = SqliteSessionStore(Path(state_dir), resume_window=settings.session_resume_window)
        _directories.append(state_dir)
    return Services(
        settings=settings,
        store=store,
        sessions=AttachedSessions(),
        transcriber=transcriber or FakeTranscriber(settings.client_sample_rate, settings.max_recording_seconds),
        generations=GenerationManager(MockProvider(llm_delay), settings.llm_timeout),
    )


class InProcessClient(EventClient):
    def __init__(self, services: Services) -> None:
        self.events: asyncio.Queue[str] = asyncio.Queue()
        self.conversation = Conversation(services, self._deliver)

    async def _deliver(self, event: Event) -> None:
        self.events.put_nowait(encode(event))

    async def send_raw(self, frame: str | bytes) -> None:
        await self.conversation.handle_frame(frame)

    async def recv_raw(self, timeout: float) -> str:
        return await asyncio.wait_for(self.events.get(), timeout)


Connect = Callable[[], AbstractAsyncContextManager[InProcessClient]]

_started: list[SessionStore] = []
_directories: list[str] = []


async def started(store: SessionStore) -> SessionStore:
    """Open `store` unless it is open already; `close_stores` closes it."""
    if not any(store is open_store for open_store in _started):
        await store.start()
        _started.append(store)
    return store


async def close_stores() -> None:
    """Close every store `started` opened and remove the temporary state directories (after each test)."""
    while _started:
        await _started.pop().close()
    while _directories:
        shutil.rmtree(_directories.pop(), ignore_errors=True)


def connector(services: Services) -> Connect:
    """`async with connect() as client:` opens one connection to `services`; leaving it closes it."""

    @asynccontextmanager
    async def connect() -> AsyncIterator[InProcessClient]:
        await started(services.store)
        client = InProcessClient(services)
        try:
            yield client
        finally:
            await client.conversation.close()

    return connect
