"""The open recordings of one connection (at most one per session) and the metrics they feed.

Opening, finishing and aborting go through here, so the open-recordings gauge and the audio
figures (seconds received and decoded, final-transcript latency, real-time factor) cannot drift
from the recordings that really exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from server import metrics
from server.audio import Chunk, FrameCarry
from stt_pool.interface import TranscriptStream

log = logging.getLogger("server.recordings")


@dataclass(slots=True)
class Recording:
    session_id: str
    sender: str
    stream: TranscriptStream
    # The stream refused audio beyond the maximum length or its buffer space; later chunks are dropped.
    full: bool = False
    wall_clock: asyncio.Task[None] | None = None
    # The bytes of a sample frame a chunk left incomplete, waiting for the next chunk.
    carry: FrameCarry = field(default_factory=FrameCarry)
    # The final text once the stream gave it; kept (the recording open) until it is recorded.
    transcript: str | None = None


WallLimitReached = Callable[[Recording], Awaitable[None]]


class Recordings:
    def __init__(self) -> None:
        self._open: dict[str, Recording] = {}

    def __len__(self) -> int:
        return len(self._open)

    def get(self, session_id: str) -> Recording | None:
        return self._open.get(session_id)

    def open(
        self, session_id: str, sender: str, stream: TranscriptStream, wall_limit: float, on_wall_limit: WallLimitReached
    ) -> Recording:
        """Open a recording; if it is still open `wall_limit` seconds later, `on_wall_limit` runs."""
        recording = Recording(session_id, sender, stream)
        self._open[session_id] = recording
        metrics.RECORDINGS.inc()
        recording.wall_clock = asyncio.create_task(
            self._expire(recording, wall_limit, on_wall_limit), name=f"recording-wall-clock:{session_id}"
        )
        return recording

    async def _expire(self, recording: Recording, wall_limit: float, on_wall_limit: WallLimitReached) -> None:
        await asyncio.sleep(wall_limit)
        if self._open.get(recording.session_id) is recording:
            await on_wall_limit(recording)

    async def append(self, recording: Recording, chunk: Chunk) -> None:
        """Hand the whole frames the chunk completes (as mono PCM) to the stream and carry the bytes of
        an incomplete frame over to the next chunk; whatever the stream kept counts as received, even
        when it refuses the rest. A chunk the stream refuses leaves the carry as it was."""
        stream = recording.stream
        frames = recording.carry.frames(chunk)
        before = stream.received_bytes
        try:
            await stream.append(frames.pcm, chunk.sample_rate)
        finally:
            metrics.AUDIO_RECEIVED.inc((stream.received_bytes - before) / (2 * stream.sample_rate))
        if frames.dropped:
            _log_dropped(recording, frames.dropped, "the audio format changed")
        recording.carry.advance(frames)

    async def transcribe(self, recording: Recording) -> str:
        """The final transcript. The recording stays open until `close` (once its text is recorded): a
        transcript the session store could not take yet is kept, never decoded twice nor lost."""
        if recording.transcript is None:
            stream = recording.stream
            started = time.perf_counter()
            recording.transcript = await stream.finish()
            metrics.STT_FINAL_LATENCY.observe(time.perf_counter() - started)
            metrics.AUDIO_DECODED.inc(stream.seconds)
            if stream.decode_cpu_seconds is not None and stream.seconds > 0:
                metrics.STT_RTF.observe(stream.decode_cpu_seconds / stream.seconds)
        return recording.transcript

    def close(self, recording: Recording) -> None:
        """The recording's transcript is recorded: the recording is over."""
        if self._open.get(recording.session_id) is recording:
            self._close(recording.session_id)

    async def abort(self, session_id: str) -> None:
        """Drop the session's recording, if any, without a transcript."""
        recording = self._close(session_id)
        if recording is not None:
            await recording.stream.abort()

    def _close(self, session_id: str) -> Recording | None:
        recording = self._open.pop(session_id, None)
        if recording is not None:
            metrics.RECORDINGS.dec()
            if dropped := recording.carry.drop():
                _log_dropped(recording, dropped, "the recording ended")
            # The wall clock may be what is closing the recording: it must not cancel itself.
            if recording.wall_clock is not None and recording.wall_clock is not asyncio.current_task():
                recording.wall_clock.cancel()
        return recording


def _log_dropped(recording: Recording, dropped: int, why: str) -> None:
    """A partial sample frame no chunk can complete is dropped: a client cutting its stream by byte
    count may leave one at the end, which is no error."""
    log.debug("partial sample frame dropped", extra={"session_id": recording.session_id, "bytes": dropped, "why": why})
