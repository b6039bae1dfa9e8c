"""The records between Sanic workers and decoding processes, declared once, and their framing.

Only these small records cross the Unix sockets (a 4-byte length, then JSON); PCM stays in the
shared-memory buffers. Workers send `ToDecoder` records, decoders answer with `ToWorker` ones.
"""

from __future__ import annotations

import struct
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

HEADER = struct.Struct("!I")
MAX_RECORD = 1 << 20


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    stream_id: str


class Open(_Record):
    """Decode the stream whose buffer holds `end` bytes so far; `force` skips the capacity check
    (a replay after a decoder died must find a home)."""

    op: Literal["open"] = "open"
    sample_rate: int
    partials: bool
    end: int
    finishing: bool
    force: bool


class Data(_Record):
    """`length` more bytes were stored at `offset` (at `sample_rate`, fixed once audio arrived)."""

    op: Literal["data"] = "data"
    sample_rate: int
    offset: int
    length: int


class Finish(_Record):
    """The recording is complete at `end` bytes: decode the rest and send the final text."""

    op: Literal["finish"] = "finish"
    end: int


class Abort(_Record):
    """Forget the stream without a transcript."""

    op: Literal["abort"] = "abort"


class Opened(_Record):
    op: Literal["opened"] = "opened"


class Refused(_Record):
    """The decoder is at capacity (streams or backlog); the worker tries the next one."""

    op: Literal["refused"] = "refused"


class Failed(_Record):
    op: Literal["failed"] = "failed"
    error: str


class Partial(_Record):
    op: Literal["partial"] = "partial"
    text: str


class Final(_Record):
    op: Literal["final"] = "final"
    text: str
    cpu_seconds: float


ToDecoder = Annotated[Open | Data | Finish | Abort, Field(discriminator="op")]
ToWorker = Annotated[Opened | Refused | Failed | Partial | Final, Field(discriminator="op")]
Record = Open | Data | Finish | Abort | Opened | Refused | Failed | Partial | Final

R = TypeVar("R")

_TO_DECODER: TypeAdapter[ToDecoder] = TypeAdapter(ToDecoder)
_TO_WORKER: TypeAdapter[ToWorker] = TypeAdapter(ToWorker)


def encode(record: Record) -> bytes:
    body = record.model_dump_json().encode()
    return HEADER.pack(len(body)) + body


class RecordReader(Generic[R]):
    """Accumulates bytes from a stream socket and yields the complete records."""

    def __init__(self, adapter: TypeAdapter[R]) -> None:
        self._adapter = adapter
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[R]:
        """Raises ValueError on a record too large or not one of the declared ones."""
        self._buffer.extend(data)
        records: list[R] = []
        while len(self._buffer) >= HEADER.size:
            (length,) = HEADER.unpack_from(self._buffer)
            if length > MAX_RECORD:
                raise ValueError(f"control record of {length} bytes")
            end = HEADER.size + length
            if len(self._buffer) < end:
                break
            records.append(self._adapter.validate_json(bytes(self._buffer[HEADER.size : end])))
            del self._buffer[:end]
        return records


def decoder_reader() -> RecordReader[ToDecoder]:
    """What a decoding process reads from a worker."""
    return RecordReader(_TO_DECODER)


def worker_reader() -> RecordReader[ToWorker]:
    """What a worker reads from a decoding process."""
    return RecordReader(_TO_WORKER)
