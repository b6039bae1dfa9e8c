"""What only a real server shows: the protocol over real WebSockets, with one and with two Sanic workers.

The protocol logic itself is tested in-process (test_conversation_*.py); here the framing, the
WebSocket layer's own limits and the isolation of connections that may land on different
workers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import orjson
import psutil
import pytest
import websockets

from config import Settings
from harness.client import ProtocolClient, b64, details_of
from harness.server import ServerProcess
from tests.conftest import LIMITED_MESSAGE_BYTES, speech


async def test_status_frames_are_utf8_json_text_with_chinese_text_unescaped(server: ServerProcess) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await client.create_session()
        await client.send("message_start", session_id=session_id, sender="对方")
        raw = await client.ws.recv()
        assert isinstance(raw, str), "server events are text frames"
        assert "正在录音" in raw
        assert "\\u" not in raw
        event = orjson.loads(raw.encode("utf-8"))
        assert event == {
            "type": "status_update",
            "data": {"session_id": session_id, "status": "recording_message", "message": "正在录音"},
        }


async def test_a_whole_conversation_over_a_websocket_with_binary_and_bad_frames_in_between(
    server: ServerProcess,
) -> None:
    async with ProtocolClient(server.ws_url) as client:
        session_id = await client.start_session(response_count=2, scenario_description="在药店买药")
        await client.send_raw("{not json")
        await client.expect_error("INVALID_EVENT_DATA", None)
        await client.record(session_id, speech(1.0), "msg_001")
        binary = orjson.dumps({"type": "manual_generate", "data": {"session_id": session_id}})
        await client.send_raw(binary)
        await client.expect_status("generating_response", session_id)
        await client.expect_suggestions("llm_response", session_id, 2)
        await client.still_works(session_id)
        await client.end_session(session_id)
        await client.send("manual_generate", session_id=session_id)
        await client.expect_error("SESSION_EXPIRED", session_id)


async def test_a_session_is_not_found_from_another_connection(server: ServerProcess) -> None:
    # With two workers the two connections usually land on different processes: same answer.
    async with ProtocolClient(server.ws_url) as owner, ProtocolClient(server.ws_url) as other:
        owned = await owner.create_session()
        await other.send("manual_generate", session_id=owned)
        await other.expect_error("SESSION_NOT_FOUND", owned)
        await owner.still_works(owned)


@pytest.mark.parametrize(
    "pad",
    [
        pytest.param("a" * LIMITED_MESSAGE_BYTES, id="ascii"),
        # Half the limit in characters, 1.5 times in bytes: the limit counts UTF-8 bytes.
        pytest.param("请更礼貌" * (LIMITED_MESSAGE_BYTES // 8), id="utf8-bytes-not-characters"),
    ],
)
async def test_a_frame_above_the_limit_is_closed_1009_and_the_service_goes_on(
    limited_server: ServerProcess, pad: str
) -> None:
    async with ProtocolClient(limited_server.ws_url) as client:
        await client.create_session()
        frame = orjson.dumps({"type": "user_modification", "data": {"pad": pad}}).decode()
        assert len(frame.encode()) > LIMITED_MESSAGE_BYTES
        await client.send_raw(frame)
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await client.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
    async with ProtocolClient(limited_server.ws_url) as client:
        await client.still_works(await client.create_session())


def service_rss(server: ServerProcess) -> int:
    """Resident memory of the service's processes (the Sanic main process and its workers)."""
    assert server.process is not None
    main = psutil.Process(server.process.pid)
    return sum(process.memory_info().rss for process in [main, *main.children(recursive=True)])


@pytest.mark.parametrize(
    ("event", "field"),
    [("user_selected_response", "selected_content"), ("user_modification", "modification")],
)
async def test_huge_text_fields_are_refused_and_the_worker_does_not_grow(
    server: ServerProcess, event: str, field: str
) -> None:
    """The attack: 60 frames of 3.9 MB text once grew a worker by 400 MB; each is now refused."""
    frame_limit = Settings.model_fields["max_message_bytes"].default
    text_bytes = min(3_900_000, frame_limit - 1024)
    frames = -(-60 * 3_900_000 // text_bytes)
    async with ProtocolClient(server.ws_url) as client:
        session_id = await client.create_session()
        before = service_rss(server)
        extra = {"sender": "我"} if event == "user_selected_response" else {}
        payload = {"session_id": session_id, field: "x" * text_bytes, **extra}
        frame = orjson.dumps({"type": event, "data": payload}).decode()
        for _ in range(frames):
            await client.send_raw(frame)
            error = await client.expect_error("INVALID_EVENT_DATA", session_id)
            assert details_of(error)["field"] == field
        grown = service_rss(server) - before
        await client.still_works(session_id)
    assert grown < 64 * 2**20, f"the service grew by {grown / 2**20:.0f} MB for refused frames"


@pytest.fixture(scope="module")
def trickle_server() -> Iterator[ServerProcess]:
    with ServerProcess(RECORDING_WALL_LIMIT_SECONDS=1) as started:
        yield started


async def test_a_recording_kept_open_by_a_trickle_is_recorded_at_the_wall_clock_limit(
    trickle_server: ServerProcess,
) -> None:
    async with ProtocolClient(trickle_server.ws_url) as client:
        first, second = await client.create_session(), await client.create_session()
        await client.open_recording(first)
        await client.send("message_start", session_id=second, sender="对方")
        await client.expect_error("RATE_LIMITED", second)
        events = []
        for _ in range(25):  # a tiny frame every 0.1 s, past the 1 s limit
            await client.send("audio_stream", session_id=first, audio_chunk=b64(speech(0.05)))
            with contextlib.suppress(TimeoutError):
                events.append(await client.recv(0.1))
        events += [await client.recv() for _ in range(4 - len(events))]
        assert [event["type"] for event in events] == [
            "status_update",
            "message_recorded",
            "status_update",
            "opinion_suggestions",
        ], events
        assert events[1]["data"]["message_content"], "what the trickle sent is recorded"
        await client.expect_silence(0.3)
        await client.record(second, speech(0.5), "msg_001")
