"""The records between Sanic workers and decoding processes: each one survives the wire intact."""

from __future__ import annotations

import pytest

from stt_pool.wire import (
    HEADER,
    MAX_RECORD,
    Abort,
    Data,
    Failed,
    Final,
    Finish,
    Open,
    Opened,
    Partial,
    Record,
    Refused,
    decoder_reader,
    encode,
    worker_reader,
)

TO_DECODER: list[Record] = [
    Open(stream_id="a1", sample_rate=16000, partials=True, end=3200, finishing=False, force=True),
    Data(stream_id="a1", sample_rate=44100, offset=3200, length=1600),
    Finish(stream_id="a1", end=4800),
    Abort(stream_id="a1"),
]
TO_WORKER: list[Record] = [
    Opened(stream_id="b2"),
    Refused(stream_id="b2"),
    Failed(stream_id="b2", error="buffer: No such file or directory"),
    Partial(stream_id="b2", text="안녕 하세요"),
    Final(stream_id="b2", text="안녕 하세요 반갑습니다", cpu_seconds=0.25),
]


@pytest.mark.parametrize("record", TO_DECODER, ids=lambda record: record.op)
def test_records_to_a_decoder_round_trip(record):
    assert decoder_reader().feed(encode(record)) == [record]


@pytest.mark.parametrize("record", TO_WORKER, ids=lambda record: record.op)
def test_records_to_a_worker_round_trip(record):
    assert worker_reader().feed(encode(record)) == [record]


def test_records_split_anywhere_arrive_whole_and_in_order():
    stream = b"".join(encode(record) for record in TO_WORKER)
    reader = worker_reader()
    received = []
    for start in range(0, len(stream), 7):
        received.extend(reader.feed(stream[start : start + 7]))
    assert received == TO_WORKER


@pytest.mark.parametrize("record", TO_WORKER, ids=lambda record: record.op)
def test_a_decoder_refuses_records_meant_for_a_worker(record):
    with pytest.raises(ValueError):
        decoder_reader().feed(encode(record))


def test_an_oversized_record_is_refused_before_it_is_buffered():
    with pytest.raises(ValueError, match="bytes"):
        worker_reader().feed(HEADER.pack(MAX_RECORD + 1))


def test_a_record_with_an_unknown_field_is_refused():
    body = b'{"op": "abort", "stream_id": "a1", "reason": "x"}'
    with pytest.raises(ValueError):
        decoder_reader().feed(HEADER.pack(len(body)) + body)
