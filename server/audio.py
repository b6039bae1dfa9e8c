"""Turning `audio_stream` events into mono s16le PCM, with a protocol error for every bad input.

An audio stream is a byte stream: a client may cut it anywhere (recorders and WebRTC/JS buffers
cut by byte count), so a sample frame (2 bytes mono, 4 stereo) can straddle two chunks. The bytes
that do not complete a frame wait in the recording's `FrameCarry` for its next chunk; the decoder
only ever receives whole frames.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import numpy as np

from server.protocol import PCM_FORMATS, AudioStream, ErrorCode, ProtocolError, describe


def _invalid(session_id: str, reason: str, **details: object) -> ProtocolError:
    return ProtocolError(
        ErrorCode.INVALID_EVENT_DATA, f"音频数据无效：{reason}", session_id=session_id, details=describe(**details)
    )


@dataclass(frozen=True, slots=True)
class Chunk:
    """One chunk as sent: interleaved s16le bytes of any length, and their format."""

    data: bytes
    sample_rate: int
    channels: int

    @property
    def frame_bytes(self) -> int:
        return 2 * self.channels


def decode_chunk(event: AudioStream, default_rate: int, default_channels: int = 1) -> Chunk:
    """The chunk's bytes and format; INVALID_EVENT_DATA for bad base64 or an encoding other than PCM16."""
    sid = event.session_id
    if event.format is not None and event.format.strip().lower() not in PCM_FORMATS:
        raise _invalid(sid, "只支持 16 位 PCM", field="format", accepted=", ".join(sorted(PCM_FORMATS)))
    try:
        data = base64.b64decode(event.audio_chunk, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(sid, "audio_chunk 不是合法的 base64", field="audio_chunk") from None
    return Chunk(data, event.sample_rate or default_rate, event.channels or default_channels)


def to_mono(frames: bytes, channels: int) -> bytes:
    """Whole frames as mono PCM: stereo is downmixed by averaging the two channels."""
    if channels == 1:
        return frames
    stereo = np.frombuffer(frames, dtype="<i2").reshape(-1, channels).astype(np.int32)
    mono: bytes = (stereo.sum(axis=1) // channels).astype("<i2").tobytes()
    return mono


@dataclass(frozen=True, slots=True)
class Frames:
    """What a chunk adds to a recording: the mono PCM of the whole frames it completes, and the bytes
    left over for the next chunk. `dropped` counts the bytes of an earlier partial frame in another
    format, which no chunk can complete any more."""

    pcm: bytes
    chunk: Chunk
    rest: bytes
    dropped: int


@dataclass(slots=True)
class FrameCarry:
    """The bytes at the end of a recording's audio that do not complete a sample frame yet.

    They are only ever joined with a chunk of the same channels and sample rate: a partial frame is
    never read in another format (a chunk in another format drops it). `frames` computes what a chunk
    adds without changing the carry; `advance` commits it once the audio was accepted, so a refused
    chunk adds nothing, not even to the carry."""

    pending: bytes = b""
    channels: int = 0
    sample_rate: int = 0

    def frames(self, chunk: Chunk) -> Frames:
        same_format = (chunk.channels, chunk.sample_rate) == (self.channels, self.sample_rate)
        carried = self.pending if same_format else b""
        data = carried + chunk.data if carried else chunk.data
        whole = len(data) - len(data) % chunk.frame_bytes
        return Frames(to_mono(data[:whole], chunk.channels), chunk, data[whole:], len(self.pending) - len(carried))

    def advance(self, frames: Frames) -> None:
        self.pending = frames.rest
        self.channels, self.sample_rate = frames.chunk.channels, frames.chunk.sample_rate

    def drop(self) -> int:
        """Forget the partial frame (the recording ends); the number of bytes dropped."""
        dropped, self.pending = len(self.pending), b""
        return dropped
