"""The labelled mock transcriber, used when no Vosk model directory exists.

Its transcript says plainly that it is simulated, so nobody mistakes it for recognised speech.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from stt_pool.interface import PartialCallback, Transcriber, TranscriptStream

MOCK_SILENCE_RMS = 64


class MockTranscriptStream(TranscriptStream):
    def __init__(self, sample_rate: int, max_seconds: float) -> None:
        super().__init__(uuid.uuid4().hex, sample_rate, max_seconds)
        self._pcm = bytearray()

    async def _store(self, pcm: bytes) -> None:
        self._pcm.extend(pcm)

    async def finish(self) -> str:
        if not self._pcm or _is_silence(bytes(self._pcm)):
            return ""
        return f"[模拟转写] 收到 {self.seconds:.1f} 秒语音（未配置 Vosk 模型）"

    async def abort(self) -> None:
        self._pcm.clear()


def _is_silence(pcm: bytes) -> bool:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    return float(np.sqrt(np.mean(samples * samples))) < MOCK_SILENCE_RMS


class MockTranscriber(Transcriber):
    mode = "mock"

    def __init__(self, sample_rate: int, max_seconds: float) -> None:
        self.sample_rate = sample_rate
        self.max_seconds = max_seconds

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def open_stream(self, on_partial: PartialCallback | None = None) -> TranscriptStream:
        return MockTranscriptStream(self.sample_rate, self.max_seconds)

    def health(self) -> dict[str, Any]:
        return {"status": "healthy", "mode": self.mode, "model_loaded": False}
