"""The records between Sanic workers and decoding processes: each one survives the wire intact."""

from __future__ import annotations

import pytest

from stt_pool import wire

TO_DECODER: list[wire.Record] = [
    wire.Open(stream_id="a1", sample_rate=16000, partials=True, end=3200, finishing=False, force=True),
    wire.Data(stream_id="a1", sample_rate=44100, offset=3200, length=1600),
    wire.Finish(stream_id="a1", end=4800),
    wire.Abort(stream_id="a1"),
]
TO_WORKER: list[wire.Record] = [
    wire.Opened(stream_id="b2"),
    wire.Refused(stream_id="b2"),
    wire.Failed(stream_id="b2", error="buffer: No such file or directory"),
    wire.Partial(stream_id="b2", text="안녕 하세요"),
    wire.Final(stream_id="b2", text="안녕 하세요 반갑습니다", cpu_seconds=0.25),
]


@pytest.mark.parametrize("record", TO_DECODER, ids=lambda record: record.op)
def test_records_to_a_decoder_round_trip(record):
    assert wire.decoder_reader().feed(wire.encode(record)) == [record]


@pytest.mark.parametrize("record", TO_WORKER, ids=lambda record: record.op)
def test_records_to_a_worker_round_trip(record):
    assert wire.worker_reader().feed(wire.encode(record)) == [record]


def test_records_split_anywhere_arrive_whole_and_in_order():
    stream = b"".join(wire.encode(record) for record in TO_WORKER)
    reader = wire.worker_reader()
    received = []
    for start in range(0, len(stream), 7):
        received.extend(reader.feed(stream[start : start + 7]))
    assert received == TO_WORKER


@pytest.mark.parametrize("record", TO_WORKER, ids=lambda record: record.op)
def test_a_decoder_refuses_records_meant_for_a_worker(record):
    with pytest.raises(ValueError):
        wire.decoder_reader().feed(wire.encode(record))


def test_an_oversized_record_is_refused_before_it_is_buffered():
    with pytest.raises(ValueError, match="bytes"):
        wire.worker_reader().feed(wire.HEADER.pack(wire.MAX_RECORD + 1))


def test_a_record_with_an_unknown_field_is_refused():
    body = b'{"op": "abort", "stream_id": "a1", "reason": "x"}'
    with pytest.raises(ValueError):
        wire.decoder_reader().feed(wire.HEADER.pack(len(body)) + body)
