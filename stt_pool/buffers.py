"""Shared-memory PCM buffers, one per recording.

A buffer is a file in the runtime directory (tmpfs: /dev/shm or systemd's /run) mapped by the
Sanic worker that writes the PCM and by the decoding process that reads it. The buffer is also
the copy of the recording the server keeps until the final transcript is delivered: if a
decoding process dies, another one maps the same file and decodes it again from the start.
Pages are only allocated when written, so sizing a buffer for the longest recording is free.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

MAX_SAMPLE_RATE = 48000


def buffer_path(directory: Path, stream_id: str) -> Path:
    return directory / f"{stream_id}.pcm"


def capacity_for(max_seconds: float) -> int:
    return int(max_seconds * MAX_SAMPLE_RATE) * 2


class PcmWriter:
    """The writing side (Sanic worker): owns the file and removes it when the stream is over."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, capacity)
            self._map = mmap.mmap(fd, capacity)
        finally:
            os.close(fd)

    def write(self, offset: int, pcm: bytes) -> None:
        self._map[offset : offset + len(pcm)] = pcm

    def close(self) -> None:
        self._map.close()
        self.path.unlink(missing_ok=True)


class PcmReader:
    """The reading side (decoding process)."""

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            self._map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)

    def read(self, start: int, end: int) -> bytes:
        return self._map[start:end]

    def close(self) -> None:
        self._map.close()
