"""The transcriber interface the server talks to; the Vosk pool and the mock both implement it.

A stream is one recording: PCM (mono, signed 16-bit little-endian) is appended while the person
speaks and `finish` returns the final text. Implementations keep the PCM of an open stream until
its final text is delivered.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any

from stt_pool.errors import AudioTooLong, SampleRateChanged

PartialCallback = Callable[[str], Coroutine[Any, Any, None]]

# The sample rates a recording may have. A fixed set, because a decoding process keeps warm
# recognisers (and their resamplers) per rate: arbitrary rates would each cost it memory.
SAMPLE_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)


class TranscriptStream(ABC):
    """One open recording. `append` enforces the length limit and a fixed sample rate."""

    def __init__(self, stream_id: str, sample_rate: int, max_seconds: float) -> None:
        self.stream_id = stream_id
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds
        self.received_bytes = 0
        # CPU time the decoder spent on this recording, when the engine reports it (real-time factor).
        self.decode_cpu_seconds: float | None = None

    @property
    def seconds(self) -> float:
        return self.received_bytes / (2 * self.sample_rate)

    async def append(self, pcm: bytes, sample_rate: int) -> None:
        """Store mono s16le PCM; raise AudioTooLong once the limit is reached, keeping what fits."""
        if sample_rate != self.sample_rate:
            if self.received_bytes:
                raise SampleRateChanged(f"sample rate changed from {self.sample_rate} to {sample_rate}")
            self.sample_rate = sample_rate
        limit = int(self.max_seconds * self.sample_rate) * 2
        kept = pcm[: max(limit - self.received_bytes, 0)]
        if kept:
            await self._store(kept)
            self.received_bytes += len(kept)
        if len(kept) < len(pcm):
            raise AudioTooLong("maximum recording length reached")

    @abstractmethod
    async def _store(self, pcm: bytes) -> None:
        """Keep the PCM (at `self.sample_rate`) and hand it to the decoder."""

    @abstractmethod
    async def finish(self) -> str:
        """Decode what is left and return the whole transcript ("" for no speech)."""

    @abstractmethod
    async def abort(self) -> None:
        """Drop the recording without a transcript."""


class Transcriber(ABC):
    mode: str

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def open_stream(self, on_partial: PartialCallback | None = None) -> TranscriptStream:
        """Open a recording; raise SttOverloaded when no capacity is left."""

    @abstractmethod
    def health(self) -> dict[str, Any]:
        """`{"status": "healthy"|"degraded"|"unavailable", "mode": ..., ...}` from a real check."""
