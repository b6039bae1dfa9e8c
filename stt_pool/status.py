"""The pool's status table: a small shared-memory file every process of the service can read.

The supervisor writes the header (pool state, model, restarts); each decoding process writes only
its own slot (pid, open streams, backlog, decoded audio). Sanic workers read it to place streams
on the least-loaded process and to answer health and metrics, without asking anybody.
Fields are plain counters: a reader may see a slot mid-update, never a broken value.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from enum import IntEnum
from pathlib import Path

import psutil

from stt_pool.layout import status_path

MAGIC = 0x53545450  # "STTP"


class PoolState(IntEnum):
    STARTING = 0
    LOADING = 1
    READY = 2
    FAILED = 3
    STOPPING = 4


class SlotState(IntEnum):
    EMPTY = 0
    STARTING = 1
    READY = 2
    DEAD = 3


class Header(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint32),
        ("state", ctypes.c_int32),
        ("supervisor_pid", ctypes.c_int32),
        ("workers", ctypes.c_int32),
        ("restarts", ctypes.c_int64),
        ("model_rss", ctypes.c_int64),
        ("model_load_ms", ctypes.c_int64),
        ("error", ctypes.c_char * 480),
    ]


class Slot(ctypes.Structure):
    _fields_ = [
        ("pid", ctypes.c_int32),
        ("state", ctypes.c_int32),
        ("streams", ctypes.c_int32),
        ("restarts", ctypes.c_int32),
        ("backlog_ms", ctypes.c_int64),
        ("decoded_ms", ctypes.c_int64),
        ("decode_cpu_ms", ctypes.c_int64),
        ("streams_done", ctypes.c_int64),
        ("heartbeat", ctypes.c_double),
    ]


class PoolStatus:
    """A view of the status file. `create` (supervisor) sizes it; `attach` maps what exists."""

    def __init__(self, buffer: mmap.mmap) -> None:
        self._buffer = buffer
        self.header = Header.from_buffer(buffer)
        count = (len(buffer) - ctypes.sizeof(Header)) // ctypes.sizeof(Slot)
        self.slots = (Slot * count).from_buffer(buffer, ctypes.sizeof(Header))

    @classmethod
    def create(cls, runtime_dir: Path, workers: int) -> PoolStatus:
        path = status_path(runtime_dir)
        size = ctypes.sizeof(Header) + workers * ctypes.sizeof(Slot)
        runtime_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        fd = os.open(temporary, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, size)
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        status = cls(buffer)
        status.header.magic = MAGIC
        status.header.workers = workers
        status.header.supervisor_pid = os.getpid()
        status.header.state = PoolState.STARTING
        os.replace(temporary, path)  # readers never see a half-initialised table
        return status

    @classmethod
    def attach(cls, runtime_dir: Path) -> PoolStatus | None:
        """The current table, or None while the supervisor has not created it yet."""
        try:
            fd = os.open(status_path(runtime_dir), os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size < ctypes.sizeof(Header):
                return None
            buffer = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        status = cls(buffer)
        return status if status.header.magic == MAGIC else None

    @classmethod
    def read_failure(cls, runtime_dir: Path) -> str:
        status = cls.attach(runtime_dir)
        if status is None or status.state is not PoolState.FAILED:
            return ""
        return status.error

    @property
    def state(self) -> PoolState:
        return PoolState(self.header.state)

    @property
    def error(self) -> str:
        return bytes(self.header.error).rstrip(b"\0").decode("utf-8", "replace")

    def fail(self, message: str) -> None:
        self.header.error = message.encode("utf-8")[: Header.error.size - 1]
        self.header.state = PoolState.FAILED

    def live_slots(self, heartbeat_age: float = 10.0) -> list[int]:
        now = time.time()
        return [
            index
            for index, slot in enumerate(self.slots)
            if slot.state == SlotState.READY and now - slot.heartbeat < heartbeat_age
        ]

    def supervisor_alive(self) -> bool:
        """Whether the process that created this table still runs (a zombie does not count)."""
        try:
            return bool(psutil.Process(int(self.header.supervisor_pid)).status() != psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return False
