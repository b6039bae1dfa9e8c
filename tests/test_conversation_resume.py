"""Sessions outlive connections, in-process against a real SQLite store: create, drop, resume, takeover, end.

Each `connect()` is a new connection to the same worker's services; leaving its block is a drop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from server.conversation import Services
from server.store import SessionExpired
from server.store.sqlite_store import SqliteSessionStore
from tests.conftest import speech
from tests.support.inprocess import Connect, build_services, connector, settings_with

PROFILE = {"name": "王医生", "relations": ["主治医生"]}


async def test_a_dropped_session_resumes_with_everything_the_client_was_told(
    connect: Connect, services: Services
) -> None:
    async with connect() as first:
        session_id = await first.start_session(
            2,
            scenario_description="在诊室",
            history_messages=[{"message_id": "h1", "sender": "医生", "content": "哪里不舒服？"}],
            user_profile={"name": "小李"},
            target_profile=PROFILE,
            options={"partial_transcripts": True},
        )
        await first.record(session_id, speech(0.5), "msg_002")
        await first.select(session_id, "头有点疼")
        await first.send("user_modification", session_id=session_id, modification="更礼貌")
        await first.expect_status("generating_response", session_id)
        await first.expect_suggestions("llm_response", session_id, 2)
        await first.send("response_count_update", session_id=session_id, response_count=3)
        await first.send("scenario_supplement", session_id=session_id, supplement="复诊")
    async with connect() as second:
        restored = await second.resume(session_id)
        assert restored["status"] == "active"
        assert restored["message_count"] == 3 and restored["response_count"] == 3
        assert restored["has_modifications"] is True and restored["scenario_description"] == "在诊室"
        await second.expect_silence(0.2)
        # The conversation goes on where it was: ids continue, the options and profiles came back.
        [held] = services.sessions.owned_by(second.conversation.connection_id)
        assert held.session.partial_transcripts and not held.session.stream_suggestions
        await second.open_recording(session_id)
        await second.send_audio(session_id, speech(0.5))
        recorded = await second.finish_recording(session_id, "msg_004")
        assert recorded["sender"] == "对方"
        await second.generate_replies(session_id, 3)
        archive = await second.end_session(session_id)
        assert archive["target_profile"] == PROFILE and archive["user_profile"] == {"name": "小李"}
    with pytest.raises(SessionExpired):
        await services.store.load(session_id)


async def test_a_recording_cut_by_a_drop_is_recorded_and_delivered_after_the_resume(
    connect: Connect, services: Services
) -> None:
    async with connect() as first:
        session_id = await first.create_session()
        await first.open_recording(session_id)
        await first.send_audio(session_id, speech(1.0))
    # The drop finished the recording; its message is in the store before anyone resumes.
    stored = await services.store.load(session_id)
    assert [m.message_id for m in stored.messages] == ["msg_001"]
    async with connect() as second:
        restored = await second.resume(session_id)
        assert restored["message_count"] == 1
        recorded = await second.expect_recorded(session_id, "msg_001", "对方", spoken=True)
        assert "1.0" in recorded["content"]
        await second.expect_silence(0.2)
        await second.record(session_id, speech(0.5), "msg_002")


async def test_a_recording_without_audio_is_dropped_with_the_connection(connect: Connect) -> None:
    async with connect() as first:
        session_id = await first.create_session()
        await first.open_recording(session_id)
    async with connect() as second:
        restored = await second.resume(session_id)
        assert restored["message_count"] == 0
        await second.expect_silence(0.2)
        await second.send("message_end", session_id=session_id)
        await second.expect_error("NO_ACTIVE_MESSAGE", session_id)


async def test_events_queued_while_detached_come_after_session_restored_in_order(
    connect: Connect, services: Services
) -> None:
    async with connect() as first:
        session_id = await first.create_session()
    queued = [{"type": "message_recorded", "data": {"n": n}} for n in range(3)]
    for event in queued:
        await services.store.enqueue_event(session_id, event)
    async with connect() as second:
        await second.resume(session_id)
        assert [await second.recv() for _ in queued] == queued
        await second.expect_silence(0.2)
    async with connect() as third:
        await third.resume(session_id)
        await third.expect_silence(0.2)  # delivered once


async def test_a_takeover_silences_the_old_connection_and_hands_over_its_recording(connect: Connect) -> None:
    async with connect() as old, connect() as new:
        session_id = await old.create_session()
        other_session = await old.create_session()
        await old.open_recording(session_id)
        await old.send_audio(session_id, speech(0.5))
        await new.resume(session_id)
        # The old connection's open recording is finished and its message goes to the new holder.
        await new.expect_recorded(session_id, "msg_001", "对方", spoken=True)
        # Frames of the old connection for that session are ignored, without an answer.
        await old.send("message_end", session_id=session_id)
        await old.send("user_selected_response", session_id=session_id, selected_content="不算数", sender="我")
        await old.expect_silence(0.3)
        await new.expect_silence(0.1)
        # The old connection keeps its other sessions.
        await old.still_works(other_session)
        await new.still_works(session_id)
        # It may take the session back with a resume of its own.
        await old.resume(session_id)
        await old.still_works(session_id)
        await new.send("user_selected_response", session_id=session_id, selected_content="已被接管", sender="我")
        await new.expect_silence(0.3)


async def test_unknown_ended_and_expired_sessions_are_refused(connect: Connect) -> None:
    async with connect() as client:
        await client.send("session_resume", session_id="no-such-session")
        await client.expect_error("SESSION_NOT_FOUND", "no-such-session")
        ended = await client.create_session()
        await client.end_session(ended)
        await client.send("session_resume", session_id=ended)
        await client.expect_error("SESSION_EXPIRED", ended)
        await client.send("session_resume", session_id="")
        await client.expect_error("INVALID_EVENT_DATA")
    short = connector(build_services(settings_with(session_resume_window=0.5)))
    async with short() as first:
        session_id = await first.create_session()
    await asyncio.sleep(0.8)
    async with short() as second:
        await second.send("session_resume", session_id=session_id)
        await second.expect_error("SESSION_EXPIRED", session_id)
        await second.still_works(await second.create_session())


async def test_resumed_sessions_count_towards_the_connection_limit() -> None:
    limited = connector(build_services(settings_with(max_sessions_per_connection=1)))
    async with limited() as first:
        kept = await first.create_session()
    async with limited() as other:
        held = await other.create_session()
        await other.send("session_resume", session_id=kept)
        await other.expect_error("RATE_LIMITED")
        await other.end_session(held)
        await other.resume(kept)
        await other.resume(kept)  # resuming what it holds already restores it again
        await other.still_works(kept)


async def test_a_store_that_cannot_write_confirms_nothing(connect: Connect, services: Services) -> None:
    async with connect() as client:
        session_id = await client.create_session()
        await services.store.close()
        await client.send("user_selected_response", session_id=session_id, selected_content="好的", sender="我")
        error = await client.expect_error("INTERNAL_ERROR", session_id)
        assert "未生效" in error["message"]
        await client.send("conversation_start", response_count=3)
        await client.expect_error("INTERNAL_ERROR")
        await client.expect_silence(0.2)


async def test_an_attached_session_never_expires_however_quiet_the_app_is() -> None:
    window = 0.5
    short = connector(build_services(settings_with(session_resume_window=window)))
    async with short() as client:
        session_id = await client.create_session()
        await client.expect_silence(3 * window)  # the user reads; the connection renews the window itself
        await client.still_works(session_id)
    await asyncio.sleep(3 * window)
    async with short() as later:
        await later.send("session_resume", session_id=session_id)
        await later.expect_error("SESSION_EXPIRED", session_id)


async def test_a_connection_losing_a_session_late_leaves_the_new_holders_generation_alone() -> None:
    slow = connector(build_services(llm_delay=0.3))
    async with slow() as old, slow() as new:
        session_id = await old.create_session()
        # The old connection is busy (as while it finishes a long recording): it notices the
        # takeover only after the new holder has started a generation of its own.
        async with old.conversation._turn:
            await new.resume(session_id)
            await new.send("manual_generate", session_id=session_id)
            await new.expect_status("generating_response", session_id)
        await new.expect_suggestions("llm_response", session_id, 3)
        await old.expect_silence(0.2)


async def test_a_confirmation_after_a_takeover_on_another_worker_goes_to_the_new_holder(tmp_path: Path) -> None:
    """Two workers share one SQLite store; the old holder's worker has not polled the store since the
    takeover (here it never does). A change the old connection makes meanwhile is stored, and its
    confirmation goes to the new holder, not to the connection that lost the session."""
    settings = settings_with()
    unaware = SqliteSessionStore(tmp_path, resume_window=settings.session_resume_window, poll_interval=3600)
    aware = SqliteSessionStore(tmp_path, resume_window=settings.session_resume_window)
    first_worker = connector(build_services(settings, store=unaware))
    second_worker = connector(build_services(settings, store=aware))
    async with first_worker() as old, second_worker() as new:
        session_id = await old.create_session()
        await new.resume(session_id)
        await old.send("user_selected_response", session_id=session_id, selected_content="谢谢医生", sender="我")
        await old.expect_silence(0.3)
        recorded = await new.expect_recorded(session_id, "usr_001", "我", spoken=False, timeout=5)
        assert recorded["content"] == "谢谢医生"
        await new.still_works(session_id)
