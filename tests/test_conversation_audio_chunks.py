"""Audio chunks of any length, driven in-process: an audio stream is a byte stream, and a client may cut
it anywhere (recorders and WebRTC/JS buffers cut by byte count). The bytes that do not complete a
sample frame wait for the recording's next chunk, so the transcriber receives exactly the PCM it gets
from whole chunks; a partial frame left at the end is dropped without an error.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import pytest

from harness.client import b64, details_of
from server.conversation import Services
from tests.conftest import LIMITED_RECORDING_SECONDS, SAMPLE_RATE, speech
from tests.support.inprocess import Connect, FakeTranscriber, InProcessClient, build_services, connector, settings_with

WHOLE_CHUNK = 3200  # 0.1 s of 16 kHz mono, a whole number of frames mono and stereo


def noise(seconds: float, channels: int = 1, seed: int = 7) -> bytes:
    """Loud random PCM: every sample differs, so a byte out of place changes what the decoder gets."""
    count = round(seconds * SAMPLE_RATE) * channels
    return np.random.default_rng(seed).integers(-12000, 12000, count, dtype="<i2").tobytes()


def downmix(pcm: bytes) -> bytes:
    """Interleaved stereo averaged to mono, computed independently of the server."""
    frames = np.frombuffer(pcm, dtype="<i2").reshape(-1, 2).astype(np.int64)
    return np.floor_divide(frames[:, 0] + frames[:, 1], 2).astype("<i2").tobytes()


def cut(pcm: bytes, sizes: list[int]) -> Iterator[bytes]:
    """`pcm` in chunks of the given sizes, taken in turn until it is used up."""
    offset, turn = 0, 0
    while offset < len(pcm):
        size = sizes[turn % len(sizes)]
        yield pcm[offset : offset + size]
        offset, turn = offset + size, turn + 1


async def send_chunks(client: InProcessClient, session_id: str, chunks: Iterator[bytes], **audio: int) -> None:
    for chunk in chunks:
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(chunk), **audio)


def dropped_frames(caplog: pytest.LogCaptureFixture) -> list[tuple[str, int, str]]:
    return [
        (record.session_id, record.bytes, record.why)
        for record in caplog.records
        if record.name == "server.recordings" and record.getMessage() == "partial sample frame dropped"
    ]


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="server.recordings")
    return caplog


@pytest.mark.parametrize(
    ("channels", "sizes"),
    [
        pytest.param(1, [29], id="mono-29"),
        pytest.param(1, [1], id="mono-1"),
        pytest.param(1, [3], id="mono-3"),
        pytest.param(1, [1001], id="mono-1001"),
        pytest.param(1, [1, 2, 3, 5, 7, 29, 1001], id="mono-mixed"),
        pytest.param(2, [5], id="stereo-5"),
        pytest.param(2, [7], id="stereo-7"),
        pytest.param(2, [1, 2, 3, 6, 4093], id="stereo-mixed"),
    ],
)
async def test_chunks_cut_anywhere_give_the_transcriber_the_pcm_of_whole_chunks(
    connect: Connect, transcriber: FakeTranscriber, debug_log: pytest.LogCaptureFixture, channels: int, sizes: list[int]
) -> None:
    pcm = noise(0.1, channels)
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await send_chunks(client, session_id, cut(pcm, [WHOLE_CHUNK]), channels=channels)
        whole = await client.finish_recording(session_id, "msg_001")
        await client.open_recording(session_id)
        await send_chunks(client, session_id, cut(pcm, sizes), channels=channels)
        odd = await client.finish_recording(session_id, "msg_002")
        await client.still_works(session_id)
    expected = pcm if channels == 1 else downmix(pcm)
    assert len(expected) == 3200
    assert transcriber.stored[0] == expected, "whole chunks reach the transcriber unchanged"
    assert transcriber.stored[1] == expected, "chunks cut anywhere reach it as the same PCM"
    assert odd["content"] == whole["content"] and "0.1 秒" in odd["content"]
    assert dropped_frames(debug_log) == [], "nothing was left over"


@pytest.mark.parametrize(
    ("channels", "trailing"),
    [pytest.param(1, b"\x07", id="mono-1-byte"), pytest.param(2, b"\x07\x08\x09", id="stereo-3-bytes")],
)
async def test_a_partial_frame_at_message_end_is_dropped_without_an_error(
    connect: Connect, transcriber: FakeTranscriber, debug_log: pytest.LogCaptureFixture, channels: int, trailing: bytes
) -> None:
    pcm = noise(0.5, channels)
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await send_chunks(client, session_id, cut(pcm + trailing, [1001]), channels=channels)
        # finish_recording reads the events strictly in order: an error would fail it.
        recorded = await client.finish_recording(session_id, "msg_001")
        await client.still_works(session_id)
    assert "0.5 秒" in recorded["content"]
    assert transcriber.stored[0] == (pcm if channels == 1 else downmix(pcm))
    assert dropped_frames(debug_log) == [(session_id, len(trailing), "the recording ended")]


async def test_a_partial_frame_is_dropped_when_the_connection_is_lost_and_the_rest_is_recorded(
    connect: Connect, transcriber: FakeTranscriber, services: Services, debug_log: pytest.LogCaptureFixture
) -> None:
    pcm = noise(0.3)
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await send_chunks(client, session_id, cut(pcm + b"\x01", [29]))
    assert transcriber.stored[0] == pcm
    assert dropped_frames(debug_log) == [(session_id, 1, "the recording ended")]
    async with connect() as client:
        await client.resume(session_id)
        recorded = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True)
        assert "0.3 秒" in recorded["content"]


async def test_a_partial_frame_is_never_read_in_the_format_of_a_later_chunk(
    connect: Connect, transcriber: FakeTranscriber, debug_log: pytest.LogCaptureFixture
) -> None:
    mono, stereo = noise(0.01, 1, seed=1), noise(0.01, 2, seed=2)
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        # One sample and one byte of the next, then stereo: that byte cannot start a stereo frame.
        await send_chunks(client, session_id, iter([mono[:3]]), channels=1)
        await send_chunks(client, session_id, cut(stereo, [7]), channels=2)
        await client.finish_recording(session_id, "msg_001")
    assert transcriber.stored[0] == mono[:2] + downmix(stereo)
    assert dropped_frames(debug_log) == [(session_id, 1, "the audio format changed")]


async def test_a_chunk_refused_for_its_sample_rate_leaves_the_partial_frame_for_the_next_chunk(
    connect: Connect, transcriber: FakeTranscriber, debug_log: pytest.LogCaptureFixture
) -> None:
    pcm = noise(0.1)
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await send_chunks(client, session_id, iter([pcm[:1001]]))
        await client.send("audio_stream", session_id=session_id, audio_chunk=b64(noise(0.05)), sample_rate=8000)
        error = await client.expect_error("INVALID_EVENT_DATA", session_id)
        assert details_of(error)["field"] == "sample_rate"
        await send_chunks(client, session_id, cut(pcm[1001:], [1001]))
        await client.finish_recording(session_id, "msg_001")
    assert transcriber.stored[0] == pcm, "the refused chunk added nothing, the byte it followed was kept"
    assert dropped_frames(debug_log) == []


async def test_chunks_cut_anywhere_count_against_the_maximum_length_by_whole_samples() -> None:
    settings = settings_with(max_recording_seconds=LIMITED_RECORDING_SECONDS)
    transcriber = FakeTranscriber(settings.client_sample_rate, settings.max_recording_seconds)
    connect = connector(build_services(settings, transcriber))
    pcm = noise(LIMITED_RECORDING_SECONDS + 0.5)
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await send_chunks(client, session_id, cut(pcm, [1001]))
        error = await client.expect_error("AUDIO_TOO_LONG", session_id)
        assert details_of(error)["max_seconds"] == str(LIMITED_RECORDING_SECONDS)
        recorded = await client.finish_recording(session_id, "msg_001")
    assert f"{LIMITED_RECORDING_SECONDS:.1f} 秒" in recorded["content"]
    assert transcriber.stored[0] == pcm[: 2 * SAMPLE_RATE * LIMITED_RECORDING_SECONDS]


async def test_a_tone_cut_into_odd_chunks_is_recorded_like_the_tone_in_whole_chunks(connect: Connect) -> None:
    """The helpers of the other tests send whole chunks; the protocol's own speech fixture works cut at 29 bytes."""
    async with connect() as client:
        session_id = await client.create_session()
        whole = await client.record(session_id, speech(0.5), "msg_001")
        odd = await client.record(session_id, speech(0.5), "msg_002", chunk_bytes=29)
    assert odd["content"] == whole["content"] and "0.5 秒" in odd["content"]
