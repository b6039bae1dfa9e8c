"""Transcriber failures become the protocol's errors, and the open-recordings gauge follows the recordings."""

from __future__ import annotations

import pytest
from prometheus_client import REGISTRY

from server.conversation import Services
from stt_pool.errors import SttError, SttOverloaded, SttTimeout
from tests.conftest import speech
from tests.support.inprocess import Connect, FakeTranscriber, build_services, connector, settings_with


@pytest.fixture
def transcriber_with_wall_limit() -> tuple[Connect, FakeTranscriber]:
    settings = settings_with(recording_wall_limit_seconds=0.2)
    transcriber = FakeTranscriber(settings.client_sample_rate, settings.max_recording_seconds)
    return connector(build_services(settings, transcriber)), transcriber


def open_recordings() -> float:
    value = REGISTRY.get_sample_value("adb_open_recordings")
    assert value is not None
    return value


@pytest.mark.parametrize(
    ("failure", "code"),
    [(SttOverloaded("full"), "STT_OVERLOADED"), (SttError("pool down"), "STT_SERVICE_ERROR")],
    ids=["overloaded", "service-error"],
)
async def test_a_refused_message_start_is_one_error_and_opens_nothing(
    connect: Connect, transcriber: FakeTranscriber, failure: SttError, code: str
) -> None:
    before = open_recordings()
    async with connect() as client:
        session_id = await client.create_session()
        transcriber.refuse(failure)
        await client.send("message_start", session_id=session_id, sender="对方")
        await client.expect_error(code, session_id)
        assert open_recordings() == before
        await client.record(session_id, speech(0.5), "msg_001")
        assert open_recordings() == before


@pytest.mark.parametrize(
    ("failure", "code"),
    [(SttTimeout("late"), "SERVICE_TIMEOUT"), (SttError("decoder lost"), "STT_SERVICE_ERROR")],
    ids=["timeout", "service-error"],
)
async def test_a_failed_finish_keeps_the_recording_for_another_message_end(
    connect: Connect, transcriber: FakeTranscriber, failure: SttError, code: str
) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await client.send_audio(session_id, speech(1.0))
        transcriber.fail_finish(failure)
        await client.send("message_end", session_id=session_id)
        await client.expect_status("processing_stt", session_id)
        error = await client.expect_error(code, session_id)
        assert "message_end" in error["message"], "the message says how to get the transcript"
        recorded = await client.finish_recording(session_id, "msg_001")
        assert "1.0" in recorded["content"], "the audio was kept"


async def test_the_open_recordings_gauge_counts_open_finished_and_dropped_recordings(
    connect: Connect, services: Services
) -> None:
    before = open_recordings()
    async with connect() as first:
        async with connect() as second:
            first_id, second_id = await first.create_session(), await second.create_session()
            await first.open_recording(first_id)
            await second.open_recording(second_id)
            assert open_recordings() == before + 2
            await first.send_audio(first_id, speech(0.5))
            await first.finish_recording(first_id)
            assert open_recordings() == before + 1
        assert open_recordings() == before, "closing the connection dropped its recording"
    assert len(services.sessions) == 0


async def test_a_failed_finish_at_the_wall_clock_limit_keeps_the_recording_for_message_end(
    transcriber_with_wall_limit: tuple[Connect, FakeTranscriber],
) -> None:
    connect, transcriber = transcriber_with_wall_limit
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await client.send_audio(session_id, speech(1.0))
        transcriber.fail_finish(SttError("decoder lost"))
        await client.expect_status("processing_stt", session_id)
        await client.expect_error("STT_SERVICE_ERROR", session_id)
        recorded = await client.finish_recording(session_id, "msg_001")
        assert "1.0" in recorded["content"], "the audio was kept and message_end still works"


async def test_a_full_buffer_is_answered_once_per_recording_and_what_was_stored_is_recorded(
    connect: Connect, transcriber: FakeTranscriber
) -> None:
    transcriber.buffer_bytes = len(speech(1.0))
    async with connect() as client:
        session_id = await client.create_session()
        await client.open_recording(session_id)
        await client.send_audio(session_id, speech(1.0))
        await client.send_audio(session_id, speech(0.5))
        await client.expect_error("STT_SERVICE_ERROR", session_id)
        # The app keeps streaming while the button is held: one error, not one per refused chunk.
        await client.send_audio(session_id, speech(0.5))
        await client.send_audio(session_id, speech(0.5))
        recorded = await client.finish_recording(session_id, "msg_001")
        assert "1.0" in recorded["content"], "what was stored before the buffer filled is transcribed"
        await client.open_recording(session_id)
        await client.send_audio(session_id, speech(0.5))
        await client.send_audio(session_id, speech(1.0))
        await client.expect_error("STT_SERVICE_ERROR", session_id)
        recorded = await client.finish_recording(session_id, "msg_002")
        assert "0.5" in recorded["content"], "the next recording gets its own refusal"
