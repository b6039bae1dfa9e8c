"""Configuration and logs: a bad value stops start-up with one line, `.env` is read, the environment wins."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from config import ConfigError, load_settings
from config.logs import TextFormatter
from harness.client import ProtocolClient, details_of
from harness.server import ROOT, ServerProcess, free_port, http_get
from tests.conftest import speech
from tests.support.deploy import make_fake_model


def run_server_expecting_exit(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {
        **os.environ,
        "ENV_FILE": os.devnull,
        "HOST": "127.0.0.1",
        "PORT": str(free_port()),
        "RUNTIME_DIR": str(tmp_path / "run"),
        "STATE_DIR": str(tmp_path / "state"),
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
        ("USE_REAL_VOSK", "maybe"),
        ("ALLOWED_ORIGINS", '["https://app.example.com"'),
        ("ALLOWED_ORIGINS", "app.example.com"),
        ("MAX_WORKERS", "0"),
        ("LOG_MAX_SIZE", "100XB"),
        ("LOG_BACKUP_COUNT", "-1"),
        ("MAX_CONNECTIONS_PER_IP", "0"),
        ("WEBSOCKET_SEND_TIMEOUT", "0"),
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
            # Cut inside a stereo frame: the two bytes that do not complete it wait for the next chunk.
            for chunk in (stereo_8k[:6], stereo_8k[6:]):
                await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(chunk).decode())
            await client.send("message_end", session_id=session_id)
            await client.expect_status("processing_stt", session_id)
            recorded = await client.expect("message_recorded", session_id=session_id)
            assert "1.0 秒" in recorded["content"], "one second of 8 kHz stereo, not 0.5 s of 16 kHz mono"


def test_max_workers_and_workers_that_disagree_stop_start_up_naming_both(tmp_path: Path) -> None:
    result = run_server_expecting_exit(tmp_path, WORKERS="2", MAX_WORKERS="3")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "MAX_WORKERS" in result.stderr and "WORKERS (2)" in result.stderr


def test_max_workers_sets_the_number_of_sanic_workers() -> None:
    with ServerProcess(MAX_WORKERS=2) as server:
        deadline = time.monotonic() + 30
        while len({line for line in server.logs().splitlines() if "Worker ready [" in line}) < 2:
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.1)
        ready = [record["pid"] for record in server.log_records() if record["msg"].startswith("Worker ready")]
        assert len(set(ready)) == 2


def test_use_real_vosk_false_runs_the_mock_transcriber_even_with_a_model(tmp_path: Path) -> None:
    model = make_fake_model(tmp_path / "model")
    refused = run_server_expecting_exit(tmp_path, VOSK_MODEL_PATH=str(model), USE_REAL_VOSK="true")
    assert refused.returncode != 0, "the fake model is really looked at when USE_REAL_VOSK is true"
    with ServerProcess(VOSK_MODEL_PATH=model, USE_REAL_VOSK="false", wait_for_stt=False) as server:
        assert server.health()["engines"]["stt"]["mode"] == "mock"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ('["*"]', ("*",)),
        ('["https://app.example.com", "http://localhost:3000/"]', ("https://app.example.com", "http://localhost:3000")),
        ("https://app.example.com, http://LOCALHOST:3000", ("https://app.example.com", "http://localhost:3000")),
    ],
)
def test_allowed_origins_take_the_seed_era_forms(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: tuple[str, ...]
) -> None:
    monkeypatch.setenv("ALLOWED_ORIGINS", value)
    assert load_settings(os.devnull).allowed_origins == expected


@pytest.mark.parametrize(
    ("value", "expected"), [("100MB", 100 * 1024**2), ("512kb", 512 * 1024), ("1G", 1024**3), ("4096", 4096)]
)
def test_log_max_size_takes_units(monkeypatch: pytest.MonkeyPatch, value: str, expected: int) -> None:
    monkeypatch.setenv("LOG_MAX_SIZE", value)
    assert load_settings(os.devnull).log_max_size == expected


def test_an_invalid_log_max_size_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOG_MAX_SIZE", "lots")
    with pytest.raises(ConfigError, match="LOG_MAX_SIZE"):
        load_settings(os.devnull)


async def test_log_max_size_and_backup_count_rotate_the_log_file(tmp_path: Path) -> None:
    log_file = tmp_path / "logs" / "server.log"
    with ServerProcess(LOG_FILE=log_file, LOG_MAX_SIZE="2KB", LOG_BACKUP_COUNT=2) as server:
        for _ in range(20):
            async with ProtocolClient(server.ws_url) as client:
                await client.start_session()
        deadline = time.monotonic() + 10
        while not (log_file.parent / "server.log.2").exists():
            assert time.monotonic() < deadline, sorted(log_file.parent.iterdir())
            await asyncio.sleep(0.1)
    files = sorted(path.name for path in log_file.parent.iterdir())
    assert files == ["server.log", "server.log.1", "server.log.2"], "two backups, no more"
    longest_line = max(len(line) for line in (log_file.parent / "server.log.1").read_bytes().splitlines(keepends=True))
    assert (log_file.parent / "server.log.1").stat().st_size <= 2048 + longest_line


def test_text_logs_escape_control_characters_a_client_sent() -> None:
    """A refused Origin is logged as the browser sent it: terminal escapes in it are shown, not obeyed."""
    with ServerProcess(LOG_FORMAT="text", ALLOWED_ORIGINS="https://app.example.com") as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            sock.sendall(
                b"GET /conversation HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                b"Origin: https://evil\x1b[2J\x1b[1;1H\x07.example\r\n\r\n"
            )
            assert sock.recv(100).startswith(b"HTTP/1.1 403")
        deadline = time.monotonic() + 10
        while "origin not allowed" not in server.logs():
            assert time.monotonic() < deadline, server.logs()
            time.sleep(0.05)
        logged = next(line for line in server.logs().splitlines() if "origin not allowed" in line)
    assert "origin=https://evil\\x1b[2J\\x1b[1;1H\\x07.example" in logged
    assert "\x1b" not in logged and "\x07" not in logged


def test_the_text_formatter_keeps_one_record_on_one_line_and_indents_tracebacks() -> None:
    formatter = TextFormatter()
    record = logging.LogRecord("server.test", logging.INFO, __file__, 1, "hello %s", ("a\r\nb\u2028c",), None)
    record.session_id = "s\n1"
    assert formatter.format(record).endswith("hello a\\r\\nb\\u2028c session_id=s\\n1")
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        failed = logging.LogRecord("server.test", logging.ERROR, __file__, 1, "boom", (), sys.exc_info())
    first, *rest = formatter.format(failed).splitlines()
    assert first.endswith("boom")
    assert rest and all(line.startswith("    ") for line in rest)


@pytest.mark.parametrize("mode", [0o755, 0o1777])
def test_a_runtime_dir_that_is_not_private_is_refused_and_not_emptied(tmp_path: Path, mode: int) -> None:
    """RUNTIME_DIR is emptied at every start: set to /tmp or a home directory by mistake, it must not be."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(mode)
    (shared / "someone-elses-file").write_text("keep me")
    result = run_server_expecting_exit(tmp_path, RUNTIME_DIR=str(shared))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "RUNTIME_DIR" in result.stderr
    assert (shared / "someone-elses-file").read_text() == "keep me"


def test_a_ping_timeout_not_longer_than_the_stt_timeout_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pong can wait behind a message_end that waits STT_TIMEOUT for its transcript."""
    monkeypatch.setenv("STT_TIMEOUT", "60")
    with pytest.raises(ConfigError, match=r"WEBSOCKET_PING_TIMEOUT \(45\) must be longer than STT_TIMEOUT \(60\)"):
        load_settings(os.devnull)
    monkeypatch.setenv("WEBSOCKET_PING_TIMEOUT", "75")
    settings = load_settings(os.devnull)
    assert (settings.websocket_ping_timeout, settings.stt_timeout) == (75, 60)
