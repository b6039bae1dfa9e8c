"""Shared-memory PCM buffers, one per recording.

A buffer is a file in the runtime directory (tmpfs: /dev/shm or systemd's /run) mapped by the
Sanic worker that writes the PCM and by the decoding process that reads it. The buffer is also
the copy of the recording the server keeps until the final transcript is delivered: if a
decoding process dies, another one maps the same file and decodes it again from the start.

The file is sized for the longest recording but sparse; space is reserved with
`posix_fallocate` ahead of every write, because storing through a mapping into a page the
filesystem cannot supply kills the writer with SIGBUS. A full filesystem is thus a clean
`BufferFull` for the one recording that needed more space.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

from stt_pool.errors import BufferFull, SttError
from stt_pool.interface import SAMPLE_RATES

# Space is reserved in steps: one system call per couple of seconds of audio, little left unused.
RESERVE_STEP = 64 * 1024


def capacity_for(max_seconds: float) -> int:
    return int(max_seconds * max(SAMPLE_RATES)) * 2


class PcmWriter:
    """The writing side (Sanic worker): owns the file and removes it when the stream is over."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.path = path
        self.capacity = capacity
        self.reserved = 0
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        except OSError as error:
            raise SttError(f"cannot create the audio buffer: {error.strerror}") from None
        try:
            os.ftruncate(self._fd, capacity)
            self._map = mmap.mmap(self._fd, capacity)
        except OSError as error:
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise SttError(f"cannot map the audio buffer: {error.strerror}") from None

    def write(self, offset: int, pcm: bytes) -> None:
        """Store `pcm` at `offset`; raise BufferFull (storing nothing) when no space is left."""
        end = offset + len(pcm)
        if end > self.reserved:
            target = min(self.capacity, -(-end // RESERVE_STEP) * RESERVE_STEP)
            try:
                os.posix_fallocate(self._fd, self.reserved, target - self.reserved)
            except OSError as error:
                raise BufferFull(f"no space for the audio buffer: {error.strerror}") from None
            self.reserved = target
        self._map[offset:end] = pcm

    def close(self) -> None:
        if self._map.closed:
            return
        self._map.close()
        os.close(self._fd)
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
