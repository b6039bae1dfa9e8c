"""The current app (upstream HEAD), replayed over a real WebSocket against the real service.

Event shapes and order are the app's (../shared/CLIENTS.md, "current"): 1 s audio chunks that
carry `duration`/`format`/`sample_rate`/`channels`, `manual_generate` with `user_corpus` and
`focused_message_ids: []`, a history whose silent recording has `content: ""`, a
`target_profile`. Every field the app reads is checked with the Dart type it casts to.
"""

from __future__ import annotations

from harness.fake_openrouter import FakeOpenRouter, Reply
from harness.server import ServerProcess
from harness.speech import read_pcm
from tests.support.apps import MAX_RECORDING_SECONDS, AppClient, cast

HISTORY = [
    {"message_id": "msg_1732950000101", "sender": "医生", "content": "最近睡得怎么样？"},
    {"message_id": "msg_1732950000102", "sender": "医生", "content": ""},
    {"message_id": "msg_1732950000103", "sender": "我", "content": "还是经常半夜醒。"},
]
TARGET_PROFILE = {
    "name": "王医生",
    "age": 52,
    "gender": "男",
    "relations": ["主治医生"],
    "personalities": ["耐心", "说话很快"],
    "preferences": ["简短的回答"],
    "taboos": ["不要提费用"],
    "common_topics": ["睡眠", "用药"],
}
ONE_SECOND = 32000


# What the current app adds to every chunk.
APP_AUDIO_FIELDS = {
    "duration": lambda chunk: len(chunk) / ONE_SECOND,
    "format": "pcm16",
    "sample_rate": 16000,
    "channels": 1,
}


async def record(app: AppClient, session_id: str, pcm: bytes, sender: str = "医生") -> dict[str, object]:
    """Hold the record button: message_start, 1 s chunks, message_end; returns the recorded message."""
    await app.send("message_start", session_id=session_id, sender=sender)
    await app.read_status("recording_message")
    await app.stream(session_id, pcm, ONE_SECOND, **APP_AUDIO_FIELDS)
    await app.send("message_end", session_id=session_id)
    await app.read_status("processing_stt")
    recorded = await app.read("message_recorded")
    cast(recorded, "session_id", "String")
    cast(recorded, "message_id", "String")
    cast(recorded, "message_content", "String")
    cast(recorded, "sender", "String?")
    await app.read_status("generating_opinions")
    await app.read_suggestions("opinion_suggestions")
    return recorded


async def generate(app: AppClient, session_id: str, corpus: str) -> list[str]:
    await app.send("manual_generate", session_id=session_id, focused_message_ids=[], user_corpus=corpus)
    await app.read_status("generating_response")
    return await app.read_suggestions("llm_response")


async def test_a_whole_conversation(app_server: ServerProcess, fake_provider: FakeOpenRouter) -> None:
    async with AppClient(app_server.ws_url) as app:
        await app.send(
            "conversation_start",
            scenario_description="社区医院复诊",
            response_count=3,
            history_messages=HISTORY,
            target_profile=TARGET_PROFILE,
        )
        session_id = await app.read_session_created()
        await app.read_suggestions("opinion_suggestions")
        # One second after session_created the app asks for replies with an empty corpus.
        assert len(await generate(app, session_id, "")) == 3
        recorded = await record(app, session_id, read_pcm("ko_short.wav"))
        assert recorded["message_content"], "the partner's speech was transcribed"
        assert recorded["message_id"] not in {item["message_id"] for item in HISTORY}
        replies = await generate(app, session_id, "想问能不能换一种药")
        await app.send("user_modification", session_id=session_id, modification="更礼貌一点")
        await app.read_status("generating_response")
        assert len(await app.read_suggestions("llm_response")) == 3
        await app.send("user_selected_response", session_id=session_id, selected_content=replies[0], sender="我")
        selected = await app.read("message_recorded")
        assert "message_content" not in selected, "the app adds the selected reply itself"
        assert cast(selected, "message_id", "String") != recorded["message_id"]
        await app.send("conversation_end", session_id=session_id)
        archive = await app.read("profile_archive")
        assert cast(archive, "session_id", "String") == session_id
        assert cast(archive, "target_profile", "Map") == TARGET_PROFILE
        assert archive["user_profile"] is None
        await app.expect_silence(0.5)
    # The empty corpus is answered from the replies prepared with the first keywords (SPECULATIVE_REPLIES), or,
    # when it arrives before they are written, also asked of the provider, racing them: at most one such call.
    speculative = fake_provider.prompts("opinions_with_replies", containing="社区医院复诊")
    prompts = fake_provider.prompts("replies", containing="社区医院复诊")
    assert "【用户的观点】（无）" in speculative[0], "an empty user_corpus is no opinion"
    typed = [prompt for prompt in prompts if "想问能不能换一种药" in prompt]
    assert len(typed) == 2, "user_corpus reaches the prompt, and stays the opinion for the modification"
    raced = [prompt for prompt in prompts if prompt not in typed]
    assert len(raced) <= 1 and all("【用户的观点】（无）" in prompt for prompt in raced)
    prompts = typed
    for fragment in ("王医生", "52 岁", "主治医生", "不要提费用", "常聊话题：睡眠、用药"):
        assert fragment in prompts[0], f"the target profile reaches the prompt: {fragment}"
    assert "[msg_1732950000102] 医生：（无语音内容）" in speculative[0], "the silent history message is kept"


async def test_a_refused_recording_is_one_error_and_its_stray_chunks_are_dropped(app_server: ServerProcess) -> None:
    pcm = read_pcm("ko_short.wav")
    async with AppClient(app_server.ws_url) as other, AppClient(app_server.ws_url) as app:
        await other.send("conversation_start", response_count=3, history_messages=[])
        other_id = await other.read_session_created()
        await other.send("message_start", session_id=other_id, sender="医生")  # takes the only decoder slot
        await other.read_status("recording_message")
        await app.send("conversation_start", response_count=3, history_messages=[])
        session_id = await app.read_session_created()
        await app.send("message_start", session_id=session_id, sender="医生")
        error = await app.read_error("STT_OVERLOADED")
        assert error["session_id"] == session_id
        # The user still holds the button: three more seconds of chunks, then releases it.
        await app.stream(session_id, pcm[: 3 * ONE_SECOND], ONE_SECOND, **APP_AUDIO_FIELDS)
        await app.send("message_end", session_id=session_id)
        await app.expect_silence(1.0)
        await other.send("conversation_end", session_id=other_id)
        await other.read("profile_archive")
        recorded = await record(app, session_id, pcm)
        assert recorded["message_content"]


async def test_every_error_the_app_can_trigger_is_an_event_it_can_read(
    app_server: ServerProcess, fake_provider: FakeOpenRouter
) -> None:
    async with AppClient(app_server.ws_url) as app:
        await app.send("conversation_start", response_count=2, history_messages=[], target_profile={"name": "小李"})
        session_id = await app.read_session_created()
        await app.send("heartbeat")
        await app.send("heartbeat", data={"timestamp": 1732950000})
        await app.expect_silence(0.3)
        # Held the button past the maximum length: one AUDIO_TOO_LONG, and what fitted is recorded.
        pcm = read_pcm("ko_long.wav")[: (MAX_RECORDING_SECONDS + 2) * ONE_SECOND]
        await app.send("message_start", session_id=session_id, sender="对方")
        await app.read_status("recording_message")
        await app.stream(session_id, pcm, ONE_SECOND, **APP_AUDIO_FIELDS)
        await app.read_error("AUDIO_TOO_LONG")
        await app.send("message_end", session_id=session_id)
        await app.read_status("processing_stt")
        cast(await app.read("message_recorded"), "message_content", "String")
        await app.read_status("generating_opinions")
        await app.read_suggestions("opinion_suggestions")
        # The provider fails (a typed opinion: nothing was prepared for it).
        fake_provider.set_default(Reply(status=500), task="replies")
        await app.send("manual_generate", session_id=session_id, focused_message_ids=[], user_corpus="我想先问问价格")
        await app.read_status("generating_response")
        await app.read_error("LLM_SERVICE_ERROR")
        # An empty reply selected (an empty text field).
        await app.send("user_selected_response", session_id=session_id, selected_content="", sender="我")
        await app.read_error("INVALID_EVENT_DATA")
        # The 5 s opinion timer fires after the conversation ended.
        await app.send("conversation_end", session_id=session_id)
        await app.read("profile_archive")
        await app.send("manual_generate", session_id=session_id, focused_message_ids=[], user_corpus="好")
        await app.read_error("SESSION_EXPIRED")


async def test_after_a_reconnect_resume_and_the_old_session_id_answer_events_the_app_can_read(
    app_server: ServerProcess,
) -> None:
    async with AppClient(app_server.ws_url) as app:
        await app.send("conversation_start", response_count=2, history_messages=[])
        session_id = await app.read_session_created()
    async with AppClient(app_server.ws_url) as app:
        await app.send("session_resume", session_id=session_id)
        kind, data = await app.next_event(10)
        if kind == "session_restored":
            for field, dart in [
                ("session_id", "String"),
                ("status", "String"),
                ("message_count", "int"),
                ("response_count", "int"),
                ("has_modifications", "bool"),
                ("restored_at", "String"),
                ("scenario_description", "String?"),
            ]:
                cast(data, field, dart)
            await app.send("manual_generate", session_id=session_id, focused_message_ids=[], user_corpus="")
            await app.read_status("generating_response")
        else:
            assert kind == "error", data
            await app.send("manual_generate", session_id=session_id, focused_message_ids=[], user_corpus="")
            await app.read_error("SESSION_NOT_FOUND")
