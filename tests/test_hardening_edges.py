"""Attacks on the edges of the service, each reproduced against a real server (issue 13, "Edges"):
frames too large or not UTF-8, clients that stop reading, too many connections from one address,
and pages from a foreign Origin."""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import Iterator

import orjson
import psutil
import pytest
import websockets
from websockets.frames import Opcode

from config import Settings
from harness.client import ProtocolClient
from harness.server import ServerProcess, http_get
from tests.conftest import running_server, speech
from tests.support.raw_websocket import RawWebSocket

CONNECTIONS_PER_IP = 3
SEND_TIMEOUT = 2
ALLOWED_ORIGIN = "https://app.example.com"
# Far longer than the send timeout plus the time to fill the kernel's socket buffers.
FLOOD_CAP_SECONDS = 90
# Memory a non-reading client may cost a worker (before the fix: 1.4-1.8 GB in 15 s).
MAX_GROWTH_BYTES = 100 * 1024 * 1024


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerProcess]:
    with running_server(
        MAX_CONNECTIONS_PER_IP=CONNECTIONS_PER_IP,
        WEBSOCKET_SEND_TIMEOUT=SEND_TIMEOUT,
        ALLOWED_ORIGINS=f'["{ALLOWED_ORIGIN}"]',
    ) as server:
        yield server


def worker(server: ServerProcess) -> psutil.Process:
    pids = [record["pid"] for record in server.log_records() if record["msg"].startswith("Worker ready")]
    return psutil.Process(pids[-1])


def open_recordings(server: ServerProcess) -> float:
    status, body = http_get(server.base_url + "/metrics")
    assert status == 200
    lines = [line for line in body.decode().splitlines() if line.startswith("adb_open_recordings")]
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines)


async def wait_until_no_connections(server: ServerProcess) -> None:
    deadline = time.monotonic() + 30
    while server.health()["stats"]["connections"]:
        assert time.monotonic() < deadline, "the connection was released"
        await asyncio.sleep(0.1)


def flood_without_reading(raw: RawWebSocket, frame: bytes, process: psutil.Process) -> tuple[int, int]:
    """Send `frame` until the server drops the connection; return (bytes sent, peak RSS)."""
    raw.sock.settimeout(1.0)
    sent, peak = 0, process.memory_info().rss
    started = time.monotonic()
    while time.monotonic() - started < FLOOD_CAP_SECONDS:
        try:
            raw.sock.sendall(frame)
            sent += len(frame)
        except TimeoutError:
            pass  # the server stopped reading: its back-pressure reached us
        except (ConnectionResetError, BrokenPipeError):
            return sent, max(peak, process.memory_info().rss)
        peak = max(peak, process.memory_info().rss)
    pytest.fail(f"a client that never reads was not closed: sent {sent / 1e6:.0f} MB, worker RSS {peak / 1e6:.0f} MB")


async def test_a_client_that_stops_reading_is_closed_and_its_recording_released(guarded: ServerProcess) -> None:
    process = worker(guarded)
    before = process.memory_info().rss
    raw = RawWebSocket(guarded.port)
    raw.send(RawWebSocket.event("conversation_start", response_count=3))
    session_id = raw.read_event()["data"]["session_id"]
    raw.send(RawWebSocket.event("message_start", session_id=session_id, sender="other"))
    assert raw.read_event()["data"]["status"] == "recording_message"
    assert open_recordings(guarded) == 1
    # Each frame is answered with an error event that this client never reads.
    unknown = RawWebSocket.event("no_such_event", pad="a" * 1000)
    sent, peak = flood_without_reading(raw, unknown, process)
    raw.close()
    await wait_until_no_connections(guarded)
    assert open_recordings(guarded) == 0
    assert peak - before < MAX_GROWTH_BYTES, f"worker grew by {(peak - before) / 1e6:.0f} MB ({sent / 1e6:.0f} MB sent)"
    assert "client has not read" in guarded.logs()
    async with ProtocolClient(guarded.ws_url) as client:
        await client.start_session()


async def test_a_ping_flood_that_never_reads_the_pongs_is_bounded_and_closed(guarded: ServerProcess) -> None:
    process = worker(guarded)
    before = process.memory_info().rss
    raw = RawWebSocket(guarded.port)
    pings = RawWebSocket.frame(Opcode.PING, b"p" * 125) * 1000
    sent, peak = flood_without_reading(raw, pings, process)
    raw.close()
    await wait_until_no_connections(guarded)
    assert peak - before < MAX_GROWTH_BYTES, f"worker grew by {(peak - before) / 1e6:.0f} MB ({sent / 1e6:.0f} MB sent)"


async def test_a_text_frame_that_is_not_utf8_closes_with_1007_without_a_traceback(guarded: ServerProcess) -> None:
    raw = RawWebSocket(guarded.port, receive_buffer=65536)
    raw.send(RawWebSocket.frame(Opcode.TEXT, b'{"type": "conversation_start", "data": "\xff\xfe"}'))
    assert raw.read_close_code() == 1007
    raw.close()
    await wait_until_no_connections(guarded)
    assert "Traceback" not in guarded.logs()
    assert "never retrieved" not in guarded.logs()
    async with ProtocolClient(guarded.ws_url) as client:
        await client.start_session()


async def test_one_second_of_48k_stereo_fits_in_a_frame_and_a_frame_above_the_limit_closes_1009(
    guarded: ServerProcess,
) -> None:
    limit = Settings.model_fields["max_message_bytes"].default
    async with ProtocolClient(guarded.ws_url) as client:
        session_id = await client.start_session()
        one_second = speech(1.0, sample_rate=48000, channels=2)
        recorded = await client.record(
            session_id, one_second, chunk_bytes=len(one_second), sample_rate=48000, channels=2
        )
        assert "1.0" in recorded["content"]
        oversized = orjson.dumps({"type": "audio_stream", "data": {"session_id": session_id, "pad": "a" * limit}})
        assert len(oversized) > limit
        await client.send_raw(oversized.decode())
        with pytest.raises(websockets.ConnectionClosedError) as closed:
            await client.recv()
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    largest_audio = len(base64.b64encode(speech(1.0, sample_rate=48000, channels=2)))
    assert largest_audio + 1024 < limit, "the default limit leaves room for the largest legitimate frame"


async def test_connections_beyond_the_per_address_limit_are_refused_with_1013(guarded: ServerProcess) -> None:
    clients = [await ProtocolClient(guarded.ws_url).__aenter__() for _ in range(CONNECTIONS_PER_IP)]
    try:
        for client in clients:
            await client.start_session()
        async with ProtocolClient(guarded.ws_url) as refused:
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await refused.recv()
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
            assert "too many connections" in closed.value.rcvd.reason
        # Behind the local nginx site each client is known by X-Real-IP, not by the proxy's address.
        async with websockets.connect(guarded.ws_url, additional_headers={"X-Real-IP": "203.0.113.7"}) as proxied:
            await proxied.send(orjson.dumps({"type": "conversation_start", "data": {"response_count": 2}}).decode())
            assert orjson.loads(await proxied.recv())["type"] == "session_created"
    finally:
        await clients.pop().__aexit__(None, None, None)
    async with ProtocolClient(guarded.ws_url) as again:
        await again.start_session()
    for client in clients:
        await client.__aexit__(None, None, None)


async def test_allowed_origins_refuse_foreign_pages_with_403_and_accept_the_app(guarded: ServerProcess) -> None:
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with websockets.connect(guarded.ws_url, origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert refused.value.response.status_code == 403
    async with websockets.connect(guarded.ws_url, origin=ALLOWED_ORIGIN) as allowed:  # type: ignore[arg-type]
        await allowed.send(orjson.dumps({"type": "conversation_start", "data": {"response_count": 2}}).decode())
        assert orjson.loads(await allowed.recv())["type"] == "session_created"
    async with ProtocolClient(guarded.ws_url) as no_origin:  # the phone app sends no Origin
        await no_origin.start_session()
