"""The seed-era app (the protocol of the seed README), replayed over a real WebSocket against the
real service: it must keep working as it always did.

Event shapes and order are that app's (../shared/CLIENTS.md, "seed-era"): history items with
`idx`/`time`/`is_me`, an extra `username`, 0.5 s audio chunks without any description,
`manual_generate` with `focused_message_ids` and `user_opinion`. It requires `content` and
`sender` on every `message_recorded`; every field it reads is checked with its Dart type.
"""

from __future__ import annotations

import asyncio

from harness.client import b64
from harness.fake_openrouter import FakeOpenRouter, Reply
from harness.server import ServerProcess
from harness.speech import read_pcm
from tests.support.apps import MAX_RECORDING_SECONDS, AppClient, cast

HISTORY = [
    {"message_id": "1", "idx": 0, "time": "10:02", "is_me": False, "sender": "店员", "content": "您好，想买点什么？"},
    {"message_id": "2", "idx": 1, "time": "10:02", "is_me": True, "sender": "我", "content": "我想看看耳机。"},
]
HALF_SECOND = 16000


async def read_recorded(app: AppClient) -> dict[str, object]:
    """The seed-era app needs `content` and `sender` on every message_recorded."""
    recorded = await app.read("message_recorded")
    for field in ("session_id", "message_id", "content", "sender"):
        cast(recorded, field, "String")
    return recorded


async def record(app: AppClient, session_id: str, pcm: bytes, sender: str = "店员") -> dict[str, object]:
    await app.send("message_start", session_id=session_id, sender=sender)
    await app.read_status("recording_message")
    await app.stream(session_id, pcm, HALF_SECOND)
    await app.send("message_end", session_id=session_id)
    await app.read_status("processing_stt")
    recorded = await read_recorded(app)
    await app.read_status("generating_opinions")
    await app.read_suggestions("opinion_suggestions")
    return recorded


async def test_a_whole_conversation(app_server: ServerProcess, fake_provider: FakeOpenRouter) -> None:
    async with AppClient(app_server.ws_url) as app:
        await app.send(
            "conversation_start",
            scenario_description="在商场买耳机",
            response_count=3,
            history_messages=HISTORY,
            username="小张",
        )
        session_id = await app.read_session_created()
        await app.read_suggestions("opinion_suggestions")
        recorded = await record(app, session_id, read_pcm("ko_short.wav"))
        assert recorded["content"] and recorded["sender"] == "店员"
        assert recorded["message_id"] == "msg_003"
        await app.send(
            "manual_generate", session_id=session_id, focused_message_ids=["msg_003"], user_opinion="想要降噪的"
        )
        await app.read_status("generating_response")
        replies = await app.read_suggestions("llm_response")
        assert len(replies) == 3
        await app.send("scenario_supplement", session_id=session_id, supplement="预算三百元以内")
        await app.send("response_count_update", session_id=session_id, response_count=2)
        await app.send("user_modification", session_id=session_id, modification="说得更简短")
        await app.read_status("generating_response")
        assert len(await app.read_suggestions("llm_response")) == 2
        await app.send("user_selected_response", session_id=session_id, selected_content=replies[1], sender="我")
        selected = await read_recorded(app)
        assert selected["content"] == replies[1] and selected["sender"] == "我"
        await app.send("conversation_end", session_id=session_id)
        archive = await app.read("profile_archive")  # an event type this app ignores
        assert archive == {"session_id": session_id, "user_profile": None, "target_profile": None}
        await app.expect_silence(0.5)
    prompts = fake_provider.prompts("replies", containing="在商场买耳机")
    assert "想要降噪的" in prompts[0], "user_opinion reaches the prompt"
    assert f"[msg_003] 店员：{recorded['content']} ★重点" in prompts[0]
    assert "预算三百元以内" in prompts[1] and "说得更简短" in prompts[1]


async def test_a_refused_recording_is_one_error_and_its_stray_chunks_are_dropped(app_server: ServerProcess) -> None:
    pcm = read_pcm("ko_short.wav")
    async with AppClient(app_server.ws_url) as other, AppClient(app_server.ws_url) as app:
        await other.send("conversation_start", response_count=3)
        other_id = await other.read_session_created()
        await other.send("message_start", session_id=other_id, sender="店员")
        await other.read_status("recording_message")
        await app.send("conversation_start", response_count=3, username="小张")
        session_id = await app.read_session_created()
        await app.send("message_start", session_id=session_id, sender="店员")
        await app.read_error("STT_OVERLOADED")
        await app.stream(session_id, pcm[: 4 * HALF_SECOND], HALF_SECOND)
        await app.send("message_end", session_id=session_id)
        await app.expect_silence(1.0)
        await other.send("conversation_end", session_id=other_id)
        await other.read("profile_archive")
        assert (await record(app, session_id, pcm))["content"]


async def test_every_error_the_app_can_trigger_is_an_event_it_can_read(
    app_server: ServerProcess, fake_provider: FakeOpenRouter
) -> None:
    async with AppClient(app_server.ws_url) as app:
        await app.send("conversation_start", response_count=2, username="小张")
        session_id = await app.read_session_created()
        await app.send("audio_stream", session_id=session_id, audio_chunk="AAAA")
        await app.read_error("NO_ACTIVE_MESSAGE")
        await app.send("message_end", session_id=session_id)
        await app.read_error("NO_ACTIVE_MESSAGE")
        pcm = read_pcm("ko_long.wav")[: (MAX_RECORDING_SECONDS + 1) * 2 * HALF_SECOND]
        await app.send("message_start", session_id=session_id, sender="店员")
        await app.read_status("recording_message")
        await app.stream(session_id, pcm, HALF_SECOND)
        await app.read_error("AUDIO_TOO_LONG")
        await app.send("message_end", session_id=session_id)
        await app.read_status("processing_stt")
        await read_recorded(app)
        await app.read_status("generating_opinions")
        await app.read_suggestions("opinion_suggestions")
        fake_provider.set_default(Reply(status=500), task="replies")
        await app.send("manual_generate", session_id=session_id, focused_message_ids=["nope"], user_opinion="")
        await app.read_status("generating_response")
        await app.read_error("LLM_SERVICE_ERROR")
        await app.send("user_modification", session_id=session_id, modification="")
        await app.read_error("INVALID_EVENT_DATA")
        await app.send("response_count_update", session_id=session_id, response_count=9)
        await app.read_error("INVALID_EVENT_DATA")
        await app.send("manual_generate", session_id="an-old-session", focused_message_ids=[], user_opinion="")
        await app.read_error("SESSION_NOT_FOUND")
        await app.send("conversation_end", session_id=session_id)
        await app.read("profile_archive")
        await app.send("user_selected_response", session_id=session_id, selected_content="好的", sender="我")
        await app.read_error("SESSION_EXPIRED")


async def test_upstreams_seed_era_test_client_flow_passes_against_the_default_mock() -> None:
    """Upstream's seed-era test client (tests/backend/test_audio_stream_fix.py) against `make run`'s
    defaults (no key, no model: the mock engines): it reads exactly one event per step, waits 1 s
    between steps, sends 1 KB chunks of zeros. Its `conversation_start` has a scenario, so opinions
    are generated at once; they took a real provider more than that second, and its next read
    after `message_start` must be `recording_message`. The mock takes as long as a provider does
    (MOCK_LLM_DELAY_MS default), so that `message_start` cancels them, as it did upstream."""
    with ServerProcess(MOCK_LLM_DELAY_MS=None) as server:
        async with AppClient(server.ws_url) as client:
            await client.send("conversation_start", scenario_description="测试音频流处理修复", response_count=3)
            session_id = await client.read_session_created()
            await asyncio.sleep(1)
            await client.send("message_start", session_id=session_id, sender="test_user")
            await client.read_status("recording_message")
            await asyncio.sleep(1)
            for _ in range(3):
                await client.send("audio_stream", session_id=session_id, audio_chunk=b64(bytes(1024)))
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)
            await client.send("message_end", session_id=session_id)
            await client.read_status("processing_stt")
            recorded = await read_recorded(client)
            assert recorded["content"] == "" and recorded["sender"] == "test_user"
            await client.read_status("generating_opinions")
            await asyncio.sleep(1)
            await client.send("conversation_end", session_id=session_id)
            # It reads nothing more; the end cancelled the opinions of its message (still generating).
            archive = await client.read("profile_archive")
            assert archive["session_id"] == session_id
            await client.expect_silence(0.5)
