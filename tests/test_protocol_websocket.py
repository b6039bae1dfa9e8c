"""What only a real server shows: the protocol over real WebSockets, with one and with two Sanic workers.

The protocol logic itself is tested in-process (test_conversation_*.py); here the framing, the
WebSocket layer's own limits and the isolation of connections that may land on different
workers.
"""

from __future__ import annotations

import orjson
import pytest
import websockets

from harness.client import ProtocolClient
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


async def test_a_frame_beyond_four_times_the_limit_is_refused_by_the_websocket_layer(
    limited_server: ServerProcess,
) -> None:
    async with ProtocolClient(limited_server.ws_url) as client:
        await client.create_session()
        await client.send_raw(orjson.dumps({"type": "audio_stream", "data": {"pad": "a" * 5 * LIMITED_MESSAGE_BYTES}}))
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await client.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
    async with ProtocolClient(limited_server.ws_url) as client:
        await client.still_works(await client.create_session())
