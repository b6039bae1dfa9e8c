"""The worker's side of the pool (`PoolTranscriber`) against fake decoding processes in this process.

The fakes are Unix-socket servers speaking the wire records; the status table is the real one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stt_pool.client import PoolTranscriber
from stt_pool.errors import SttOverloaded
from stt_pool.layout import buffer_dir, socket_path
from stt_pool.status import PoolState, PoolStatus, SlotState
from stt_pool.wire import Abort, Open, Opened, ToDecoder, decoder_reader, encode


@dataclass
class FakeDecoder:
    """Records what it receives; answers `open` only when `answering` (a paused process does not)."""

    answering: bool
    received: list[ToDecoder] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Answers wait for this while it is cleared (a process slow to get to its requests).
    go: asyncio.Event = field(default_factory=asyncio.Event)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.go.set()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        records = decoder_reader()
        while data := await reader.read(65536):
            for record in records.feed(data):
                self.received.append(record)
                self.changed.set()
                if isinstance(record, Open) and self.answering:
                    await self.go.wait()
                    writer.write(encode(Opened(stream_id=record.stream_id)))

    async def wait_for(self, count: int) -> list[ToDecoder]:
        async with asyncio.timeout(10):
            while len(self.received) < count:
                self.changed.clear()
                await self.changed.wait()
        return self.received


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[tuple[PoolTranscriber, list[FakeDecoder]]]:
    status = PoolStatus.create(tmp_path, 2)
    buffer_dir(tmp_path).mkdir()
    decoders = [FakeDecoder(answering=False), FakeDecoder(answering=True)]
    servers = []
    for index, decoder in enumerate(decoders):
        servers.append(await asyncio.start_unix_server(decoder.serve, str(socket_path(tmp_path, index))))
        status.slots[index].state = SlotState.READY
        status.slots[index].heartbeat = time.time()
    status.header.state = PoolState.READY
    transcriber = PoolTranscriber(
        runtime_dir=tmp_path,
        workers=2,
        default_rate=16000,
        max_seconds=10,
        timeout=5,
        model_path=tmp_path,
        open_timeout=0.5,
    )
    await transcriber.start()
    async with asyncio.timeout(10):
        while not all(link.alive for link in transcriber.links):  # noqa: ASYNC110 (no event for "all links up")
            await asyncio.sleep(0.01)
    yield transcriber, decoders, servers
    await transcriber.close()
    for server in servers:
        server.close()


async def test_an_open_given_up_on_a_paused_decoder_is_aborted_there(pool):
    """The request stays in the paused process's socket; when it resumes it must not keep a stream."""
    transcriber, (paused, live), _ = pool
    stream = await transcriber.open_stream()
    assert [type(record) for record in await paused.wait_for(2)] == [Open, Abort]
    assert {record.stream_id for record in paused.received} == {stream.stream_id}
    assert [type(record) for record in await live.wait_for(1)] == [Open]
    await stream.abort()


async def test_an_open_abandoned_by_its_caller_is_aborted(pool):
    transcriber, (paused, _), _ = pool
    transcriber.open_timeout = 30
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(transcriber.open_stream(), 0.3)
    assert [type(record) for record in await paused.wait_for(2)] == [Open, Abort]
    assert list(buffer_dir(transcriber.runtime_dir).iterdir()) == [], "the abandoned recording's buffer is gone"


async def test_when_no_decoder_answers_the_recording_is_refused_and_aborted_everywhere(pool):
    transcriber, decoders, _ = pool
    decoders[1].answering = False
    with pytest.raises(SttOverloaded):
        await transcriber.open_stream()
    for decoder in decoders:
        assert [type(record) for record in await decoder.wait_for(2)] == [Open, Abort]


async def test_a_recording_aborted_while_its_replay_waits_for_an_answer_is_aborted_there_too(pool):
    """Its decoder died, the replay's `open` is in flight on another one, the client gives up."""
    transcriber, (slow, dying), servers = pool
    stream = await transcriber.open_stream()
    await slow.wait_for(2)  # the first offer, given up on
    transcriber.open_timeout = 30
    slow.answering = True
    slow.go.clear()
    servers[1].close()
    for writer in dying.writers:
        writer.close()
    records = await slow.wait_for(3)
    assert isinstance(records[2], Open) and records[2].force, "the stream is replayed on the live process"
    await stream.abort()
    slow.go.set()
    records = await slow.wait_for(4)
    assert isinstance(records[3], Abort) and records[3].stream_id == stream.stream_id
    assert all(not link.streams for link in transcriber.links)
