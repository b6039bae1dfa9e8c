"""Control records between Sanic workers and decoding processes: length-prefixed JSON.

Only these small records cross the Unix sockets; PCM stays in the shared-memory buffers.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

HEADER = struct.Struct("!I")
MAX_RECORD = 1 << 20

Record = dict[str, Any]


def pack(record: Record) -> bytes:
    body = orjson.dumps(record)
    return HEADER.pack(len(body)) + body


class RecordReader:
    """Accumulates bytes from a stream socket and yields complete records."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Record]:
        self._buffer.extend(data)
        records: list[Record] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > MAX_RECORD:
                raise ValueError(f"control record of {length} bytes")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            records.append(orjson.loads(bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return records
