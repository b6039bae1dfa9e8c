"""The pool as seen from a Sanic worker: the `Transcriber` that streams recordings to Vosk.

Each Sanic worker connects to every decoding process over its Unix socket. A recording's PCM is
written into a shared-memory buffer; only control records (stream id, offset, length) cross the
socket. The buffer is kept until the final transcript arrives, so when a decoding process dies
(its socket closes) every stream it held is opened again on a live process, which decodes the
same buffer from the start: the client still gets its transcript.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from stt_pool import wire
from stt_pool.buffers import PcmWriter, capacity_for
from stt_pool.errors import SttError, SttOverloaded, SttTimeout
from stt_pool.interface import PartialCallback, Transcriber, TranscriptStream
from stt_pool.layout import buffer_path, socket_path
from stt_pool.status import PoolState, PoolStatus, SlotState

log = logging.getLogger("stt_pool.client")

RECONNECT_INTERVAL = 0.1
# How a decoding process answers `open`.
OpenReply = wire.Opened | wire.Refused | wire.Failed


class DecoderLink:
    """This worker's connection to one decoding process (slot `index`)."""

    def __init__(self, index: int, path: Path) -> None:
        self.index = index
        self.path = path
        self.writer: asyncio.StreamWriter | None = None
        self.reader_task: asyncio.Task[None] | None = None
        self.streams: dict[str, PoolStream] = {}
        # Replies awaited to `open`; None stands for the connection lost before the reply.
        self.pending_opens: dict[str, asyncio.Future[OpenReply | None]] = {}

    @property
    def alive(self) -> bool:
        return self.writer is not None and not self.writer.is_closing()

    def send(self, record: wire.ToDecoder) -> None:
        # Synchronous and ordered: records of one stream can never overtake each other.
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(wire.encode(record))


class PoolStream(TranscriptStream):
    def __init__(self, pool: PoolTranscriber, on_partial: PartialCallback | None) -> None:
        super().__init__(uuid.uuid4().hex, pool.default_rate, pool.max_seconds)
        self.pool = pool
        self.on_partial = on_partial
        self.buffer = PcmWriter(buffer_path(pool.runtime_dir, self.stream_id), capacity_for(pool.max_seconds))
        # Bytes in the buffer. Updated before any await, so a replay never misses a stored chunk.
        self.written = 0
        self.finishing = False
        self.released = False
        self.link: DecoderLink | None = None
        self.final: asyncio.Future[wire.Final] = asyncio.get_running_loop().create_future()

    def open_record(self, force: bool) -> wire.Open:
        return wire.Open(
            stream_id=self.stream_id,
            sample_rate=self.sample_rate,
            partials=self.on_partial is not None,
            end=self.written,
            finishing=self.finishing,
            force=force,
        )

    async def _store(self, pcm: bytes) -> None:
        offset = self.written
        self.buffer.write(offset, pcm)
        self.written += len(pcm)
        if self.link is not None:
            self.link.send(
                wire.Data(stream_id=self.stream_id, sample_rate=self.sample_rate, offset=offset, length=len(pcm))
            )

    async def finish(self) -> str:
        self.finishing = True
        if self.link is not None:
            self.link.send(wire.Finish(stream_id=self.stream_id, end=self.written))
        try:
            result = await asyncio.wait_for(asyncio.shield(self.final), self.pool.timeout)
        except TimeoutError:
            raise SttTimeout(f"no final transcript within {self.pool.timeout:.0f}s") from None
        self._release()
        self.decode_cpu_seconds = result.cpu_seconds
        return result.text

    async def abort(self) -> None:
        if self.link is not None:
            self.link.send(wire.Abort(stream_id=self.stream_id))
        self._release()

    def _release(self) -> None:
        self.released = True
        if self.link is not None:
            self.link.streams.pop(self.stream_id, None)
            self.link = None
        self.pool.orphans.pop(self.stream_id, None)
        if not self.final.done():
            self.final.cancel()
        self.buffer.close()


class PoolTranscriber(Transcriber):
    mode = "vosk"

    def __init__(
        self,
        *,
        runtime_dir: Path,
        workers: int,
        default_rate: int,
        max_seconds: float,
        timeout: float,
        model_path: Path,
        on_fatal: Callable[[str], None] | None = None,
        open_timeout: float = 5.0,
    ) -> None:
        """`runtime_dir` is where the pool supervisor keeps its files; `workers` its decoder count.

        `open_timeout`: how long a decoding process may take to answer an `open` before the
        stream is offered to the next one.
        """
        self.runtime_dir = runtime_dir
        self.default_rate = default_rate
        self.max_seconds = max_seconds
        self.timeout = timeout
        self.model_path = model_path
        self.on_fatal = on_fatal
        self.open_timeout = open_timeout
        self.links = [DecoderLink(index, socket_path(runtime_dir, index)) for index in range(workers)]
        self.status: PoolStatus | None = None
        self.orphans: dict[str, PoolStream] = {}
        self._maintainer: asyncio.Task[None] | None = None
        self._link_changed = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        self._maintainer = asyncio.create_task(self._maintain(), name="stt-pool-links")

    async def close(self) -> None:
        if self._maintainer is not None:
            self._maintainer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintainer
        for link in self.links:
            for stream in list(link.streams.values()):
                await stream.abort()
            if link.reader_task is not None:
                link.reader_task.cancel()
            if link.writer is not None:
                link.writer.close()

    async def _maintain(self) -> None:
        """Keep a connection to every decoding process; re-place streams that lost theirs."""
        while True:
            if self.status is None:
                self.status = PoolStatus.attach(self.runtime_dir)
            failure = self._failure()
            if failure:
                # Without its model or its supervisor the service must not pretend to run: stop it, once.
                log.critical("stt pool failed, stopping the service", extra={"error": failure})
                if self.on_fatal is not None:
                    self.on_fatal(failure)
                return
            if self.status is not None and self.status.state is PoolState.READY:
                for link in self.links:
                    if not link.alive:
                        await self._connect(link)
                for stream in list(self.orphans.values()):
                    await self._replay(stream)
            await asyncio.sleep(RECONNECT_INTERVAL)

    def _failure(self) -> str:
        """The pool's fatal error, if any; also notices a supervisor that died without saying so."""
        status = self.status
        if status is None:
            return ""
        if status.state in {PoolState.LOADING, PoolState.READY} and not status.supervisor_alive():
            status.fail("the pool supervisor died")
        return status.error if status.state is PoolState.FAILED else ""

    async def _connect(self, link: DecoderLink) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(link.path))
        except OSError:
            return
        link.writer = writer
        link.reader_task = asyncio.create_task(self._read(link, reader), name=f"stt-link-{link.index}")
        self._link_changed.set()

    async def _read(self, link: DecoderLink, reader: asyncio.StreamReader) -> None:
        records = wire.worker_reader()
        try:
            while data := await reader.read(65536):
                for record in records.feed(data):
                    self._dispatch(link, record)
        except (ConnectionError, OSError, ValueError):
            pass
        self._lost(link)

    def _dispatch(self, link: DecoderLink, record: wire.ToWorker) -> None:
        if isinstance(record, OpenReply) and record.stream_id in link.pending_opens:
            future = link.pending_opens.pop(record.stream_id)
            if not future.done():
                future.set_result(record)
            return
        stream = link.streams.get(record.stream_id)
        if stream is None:
            return
        if isinstance(record, wire.Final) and not stream.final.done():
            stream.final.set_result(record)
        elif isinstance(record, wire.Failed) and not stream.final.done():
            stream.final.set_exception(SttError(record.error))
        elif isinstance(record, wire.Partial) and stream.on_partial is not None:
            asyncio.create_task(stream.on_partial(record.text))  # noqa: RUF006 (fire and forget)

    def _lost(self, link: DecoderLink) -> None:
        """The decoding process behind `link` died: replay its streams elsewhere."""
        if link.writer is not None:
            link.writer.close()
        link.writer = None
        streams = list(link.streams.values())
        link.streams.clear()
        for future in link.pending_opens.values():
            if not future.done():
                future.set_result(None)
        link.pending_opens.clear()
        if streams:
            log.warning(
                "decoder connection lost, replaying streams", extra={"decoder": link.index, "streams": len(streams)}
            )
        for stream in streams:
            stream.link = None
            self.orphans[stream.stream_id] = stream

    # -- placement ------------------------------------------------------------------------------

    def _candidates(self) -> list[DecoderLink]:
        def load(link: DecoderLink) -> tuple[int, int, int]:
            # Opens still waiting for their reply count too, or a burst of streams would all pick one process.
            mine = len(link.streams) + len(link.pending_opens)
            slot = self.status.slots[link.index] if self.status is not None else None
            if slot is None:
                return (1, mine, 0)
            return (int(slot.state != SlotState.READY), max(slot.streams, mine), slot.backlog_ms)

        return sorted((link for link in self.links if link.alive), key=load)

    async def _replay(self, stream: PoolStream) -> None:
        if stream.released:
            return
        try:
            await self._place(stream, force=True)
        except SttError as error:
            self.orphans.pop(stream.stream_id, None)
            if not stream.final.done():
                stream.final.set_exception(error)

    async def _place(self, stream: PoolStream, force: bool) -> None:
        for link in self._candidates():
            reply = await self._ask_open(link, stream, force)
            if isinstance(reply, wire.Opened) and stream.released:
                link.send(wire.Abort(stream_id=stream.stream_id))  # aborted while being replayed
                return
            if isinstance(reply, wire.Opened):
                stream.link = link
                link.streams[stream.stream_id] = stream
                self.orphans.pop(stream.stream_id, None)
                return
            if isinstance(reply, wire.Failed):
                raise SttError(reply.error)
        if force:
            self.orphans[stream.stream_id] = stream
            return
        raise SttOverloaded("every decoding process is at capacity")

    async def _ask_open(self, link: DecoderLink, stream: PoolStream, force: bool) -> OpenReply | None:
        """Offer `stream` to one decoding process; None if it did not answer in time."""
        future: asyncio.Future[OpenReply | None] = asyncio.get_running_loop().create_future()
        link.pending_opens[stream.stream_id] = future
        link.send(stream.open_record(force))
        try:
            return await asyncio.wait_for(future, self.open_timeout)
        except TimeoutError:
            self._give_up_open(link, stream)
            return None
        except BaseException:
            self._give_up_open(link, stream)
            raise

    @staticmethod
    def _give_up_open(link: DecoderLink, stream: PoolStream) -> None:
        # The process may still open the stream when it gets to the request (it was paused,
        # or the recording was abandoned meanwhile): the abort behind it makes it forget it.
        link.pending_opens.pop(stream.stream_id, None)
        link.send(wire.Abort(stream_id=stream.stream_id))

    async def _wait_ready(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while not any(link.alive for link in self.links):
            failure = self._failure()
            if failure:
                raise SttError(failure)
            if loop.time() >= deadline:
                raise SttError("the speech recognition pool is not ready")
            self._link_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._link_changed.wait(), RECONNECT_INTERVAL)

    async def open_stream(self, on_partial: PartialCallback | None = None) -> TranscriptStream:
        await self._wait_ready()
        stream = PoolStream(self, on_partial)
        try:
            await self._place(stream, force=False)
        except BaseException:
            stream.buffer.close()
            raise
        return stream

    # -- health ---------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        status = self.status
        report: dict[str, Any] = {"mode": self.mode, "model": self.model_path.name, "workers": len(self.links)}
        if status is None or status.state in {PoolState.STARTING, PoolState.LOADING}:
            return {**report, "status": "degraded", "pool": "starting", "model_loaded": False, "workers_alive": 0}
        if status.state is PoolState.FAILED:
            return {**report, "status": "unavailable", "pool": "failed", "model_loaded": False, "workers_alive": 0}
        alive = [index for index in status.live_slots() if self.links[index].alive]
        state = "healthy" if len(alive) == len(self.links) else "degraded" if alive else "unavailable"
        return {
            **report,
            "status": state,
            "pool": status.state.name.lower(),
            "model_loaded": True,
            "workers_alive": len(alive),
            "streams_open": sum(slot.streams for slot in status.slots),
            "restarts": int(status.header.restarts),
        }
