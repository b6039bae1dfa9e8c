"""Turning an `audio_stream` event into mono s16le PCM, with a protocol error for every bad input."""

from __future__ import annotations

import base64
import binascii

import numpy as np

from server.protocol import PCM_FORMATS, AudioStream, ErrorCode, ProtocolError, describe


def _invalid(session_id: str, reason: str, **details: object) -> ProtocolError:
    return ProtocolError(
        ErrorCode.INVALID_EVENT_DATA, f"音频数据无效：{reason}", session_id=session_id, details=describe(**details)
    )


def decode_chunk(event: AudioStream, default_rate: int, default_channels: int = 1) -> tuple[bytes, int]:
    """Return (mono PCM, sample rate). Stereo is downmixed by averaging the two channels."""
    sid = event.session_id
    if event.format is not None and event.format.strip().lower() not in PCM_FORMATS:
        raise _invalid(sid, "只支持 16 位 PCM", field="format", accepted=", ".join(sorted(PCM_FORMATS)))
    try:
        pcm = base64.b64decode(event.audio_chunk, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid(sid, "audio_chunk 不是合法的 base64", field="audio_chunk") from None
    channels = event.channels or default_channels
    frame_bytes = 2 * channels
    if len(pcm) % frame_bytes:
        raise _invalid(sid, "字节数不是完整采样的整数倍", field="audio_chunk", bytes=len(pcm), frame_bytes=frame_bytes)
    if channels == 2:
        stereo = np.frombuffer(pcm, dtype="<i2").reshape(-1, 2).astype(np.int32)
        pcm = ((stereo[:, 0] + stereo[:, 1]) // 2).astype("<i2").tobytes()
    return pcm, event.sample_rate or default_rate
