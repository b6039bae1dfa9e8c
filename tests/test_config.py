"""Configuration and logs: a bad value stops start-up with one line, `.env` is read, the environment wins."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from harness.client import ProtocolClient, details_of
from harness.server import ROOT, ServerProcess, free_port, http_get
from tests.conftest import speech


def run_server_expecting_exit(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "ENV_FILE": os.devnull,
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "RUNTIME_DIR": str(tmp_path / "run"),
        "VOSK_MODEL_PATH": str(tmp_path / "no-model"),
        **env,
    }
    environment.pop("OPENROUTER_API_KEY", None)
    return subprocess.run(
        [sys.executable, "-m", "server"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("PORT", "abc"),
        ("PORT", "70000"),
        ("WORKERS", "0"),
        ("LOG_FORMAT", "xml"),
        ("LOG_LEVEL", "LOUD"),
        ("OPENROUTER_TEMPERATURE", "5"),
        ("STT_WORKERS", "-1"),
        ("MAX_RECORDING_SECONDS", "0"),
    ],
)
def test_an_invalid_setting_stops_start_up_with_one_line_naming_it(tmp_path: Path, variable: str, value: str) -> None:
    result = run_server_expecting_exit(tmp_path, **{variable: value})
    assert result.returncode == 2, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_an_invalid_value_in_the_env_file_stops_start_up_too(tmp_path: Path) -> None:
    env_file = tmp_path / "service.env"
    env_file.write_text("WORKERS=0\n", encoding="utf-8")
    result = run_server_expecting_exit(tmp_path, ENV_FILE=str(env_file))
    assert result.returncode == 2, result
    assert len(result.stderr.splitlines()) == 1
    assert "WORKERS" in result.stderr


def test_a_secret_in_an_invalid_setting_is_not_echoed(tmp_path: Path) -> None:
    secret = "sk-or-v1-do-not-print-me"
    result = run_server_expecting_exit(tmp_path, OPENROUTER_API_KEY=secret, WORKERS="0", METRICS_TOKEN=secret)
    assert result.returncode == 2
    assert secret not in result.stderr


async def test_the_env_file_is_read(tmp_path: Path) -> None:
    port = free_port()
    env_file = tmp_path / "service.env"
    env_file.write_text(f"# written by the test\nPORT={port}\nMAX_SESSIONS_PER_CONNECTION=1\n", encoding="utf-8")
    server = ServerProcess(PORT=port, ENV_FILE=env_file)
    del server.env["PORT"]  # the port now comes from the file alone
    with server:
        status, body = http_get(f"http://127.0.0.1:{port}/")
        assert status == 200
        assert orjson.loads(body)["status"] == "healthy"
        async with ProtocolClient(server.ws_url) as client:
            await client.start_session()
            await client.send("conversation_start", response_count=3)
            error = await client.expect_error("RATE_LIMITED")
            assert details_of(error)["limit"] == "1"


async def test_the_environment_wins_over_the_env_file(tmp_path: Path) -> None:
    file_port = free_port()
    env_file = tmp_path / "service.env"
    env_file.write_text(
        f"PORT={file_port}\nLOG_FORMAT=text\nMAX_SESSIONS_PER_CONNECTION=1\n",
        encoding="utf-8",
    )
    server = ServerProcess(ENV_FILE=env_file, LOG_FORMAT="json", MAX_SESSIONS_PER_CONNECTION=2)
    assert server.port != file_port
    with server:
        assert http_get(server.base_url + "/")[0] == 200
        with pytest.raises(OSError):
            http_get(f"http://127.0.0.1:{file_port}/", timeout=1.0)
        async with ProtocolClient(server.ws_url) as client:
            await client.start_session()
            await client.start_session()
            await client.send("conversation_start", response_count=3)
            error = await client.expect_error("RATE_LIMITED")
            assert details_of(error)["limit"] == "2"
        lines = server.logs().splitlines()
        assert lines
        assert all(line.startswith("{") for line in lines), "LOG_FORMAT from the environment, not the file"


async def test_json_logs_are_one_valid_object_per_line_and_session_lines_carry_session_id(
    server: ServerProcess,
) -> None:
    assert server.env["LOG_FORMAT"] == "json"
    chunk = base64.b64encode(speech(0.5)).decode()
    async with ProtocolClient(server.ws_url) as client:
        session_id = await client.start_session(scenario_description="在药店买药")
        await client.send("message_start", session_id=session_id, sender="店员")
        await client.expect_status("recording_message", session_id)
        await client.send("audio_stream", session_id=session_id, audio_chunk=chunk)
        await client.send("message_end", session_id=session_id)
        await client.expect_status("processing_stt", session_id)
        await client.expect("message_recorded", session_id=session_id)
        await client.expect_status("generating_opinions", session_id)
        opinions = await client.expect("opinion_suggestions", session_id=session_id)
        await client.send("message_end", session_id=session_id)
        await client.expect_error("NO_ACTIVE_MESSAGE")
        await client.end_session(session_id)
        await client.send("manual_generate", session_id=session_id)
        await client.expect_error("SESSION_EXPIRED")

    ended = '"msg":"session ended","pid"'
    deadline = time.monotonic() + 10
    while not any(ended in line and session_id in line for line in server.logs().splitlines()):
        assert time.monotonic() < deadline, "the end of the session is logged"
        await asyncio.sleep(0.05)
    text = server.logs()
    lines = text[: text.rfind("\n") + 1].splitlines()  # whole lines only: a worker may be mid-write
    records = [orjson.loads(line) for line in lines]  # raises on any line that is not JSON
    assert all(isinstance(record, dict) for record in records)
    about_session = [record for record in records if session_id in orjson.dumps(record).decode()]
    assert about_session
    assert all(record.get("session_id") == session_id for record in about_session), about_session
    messages = {record["msg"] for record in about_session}
    assert {"session created", "message recorded", "generation sent", "client error", "session ended"} <= messages
    sent = [record for record in about_session if record["msg"] == "generation sent"]
    assert opinions["request_id"] in {record.get("request_id") for record in sent}
    assert chunk[:64] not in server.logs(), "raw audio never reaches the log"


def test_a_port_in_use_stops_start_up_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = run_server_expecting_exit(tmp_path, PORT=str(taken.getsockname()[1]))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "PORT" in result.stderr and "cannot listen there" in result.stderr


async def test_audio_settings_give_the_format_of_chunks_that_do_not_declare_it() -> None:
    with ServerProcess(AUDIO_SAMPLE_RATE=8000, AUDIO_CHANNELS=2) as server:
        async with ProtocolClient(server.ws_url) as client:
            session_id = await client.start_session()
            await client.send("message_start", session_id=session_id, sender="other")
            await client.expect_status("recording_message", session_id)
            stereo_8k = speech(1.0, sample_rate=8000, channels=2)
            await client.send(
                "audio_stream", session_id=session_id, audio_chunk=base64.b64encode(stereo_8k[:6]).decode()
            )
            error = await client.expect_error("INVALID_EVENT_DATA")
            assert details_of(error)["frame_bytes"] == "4", "undeclared chunks are taken as stereo"
            await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(stereo_8k).decode())
            await client.send("message_end", session_id=session_id)
            await client.expect_status("processing_stt", session_id)
            recorded = await client.expect("message_recorded", session_id=session_id)
            assert "1.0 秒" in recorded["content"], "one second of 8 kHz stereo, not 0.5 s of 16 kHz mono"
