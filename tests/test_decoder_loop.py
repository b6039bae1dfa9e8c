"""The decoding process's loop, in this process: records over a socketpair, a fake recogniser.

The fake "recognises" each 100 ms piece as the word written into it, and reports an endpoint on
a piece holding "." -- enough to pin down scheduling, admission and recogniser reuse without Vosk.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from stt_pool import wire
from stt_pool.buffers import PcmWriter
from stt_pool.decoder import Decoder, DecoderConfig, Recognizer
from stt_pool.interface import SAMPLE_RATES
from stt_pool.layout import buffer_dir, buffer_path
from stt_pool.status import PoolStatus

RATE = 8000
PIECE = RATE // 10 * 2  # 100 ms


def piece(word: str, rate: int = RATE) -> bytes:
    return word.encode().ljust(rate // 10 * 2, b"\0")


def speech(*words: str, rate: int = RATE) -> bytes:
    return b"".join(piece(word, rate) for word in words)


@dataclass
class FakeRecognizer:
    """Vosk's state machine in small: after `Result` (an endpoint) `FinalResult` does nothing, and
    the next audio continues the old feature pipeline -- its words then come out marked "~"."""

    log: list[str]
    words: list[str] = field(default_factory=list)
    state: str = "new"
    stale: bool = False

    def AcceptWaveform(self, data: bytes) -> int:
        if self.state == "endpoint":
            self.stale = True  # Vosk's CleanUp after an endpoint keeps the feature pipeline
        elif self.state == "finalized":
            self.stale = False  # ... after a final result it starts a new one
        self.state = "running"
        word = data.rstrip(b"\0").decode()
        if data:
            self.log.append(word)
        if word == ".":
            return 1
        if word:
            self.words.append("~" + word if self.stale else word)
        return 0

    def Result(self) -> str:
        self.state = "endpoint"
        return self._take()

    def FinalResult(self) -> str:
        if self.state != "running":
            return json.dumps({"text": ""})
        self.state = "finalized"
        return self._take()

    def PartialResult(self) -> str:
        return json.dumps({"partial": " ".join(self.words)})

    def _take(self) -> str:
        text, self.words = " ".join(self.words), []
        return json.dumps({"text": text})


class Harness:
    """A decoder and one worker's end of its connection; `pump` runs the loop until a reply."""

    def __init__(self, runtime_dir: Path, **config: int) -> None:
        self.runtime_dir = runtime_dir
        buffer_dir(runtime_dir).mkdir()
        self.log: list[str] = []
        self.created: list[FakeRecognizer] = []
        settings = {"streams_limit": 4, "max_backlog_ms": 3000, "piece_ms": 100} | config
        self.decoder = Decoder(
            DecoderConfig(index=0, runtime_dir=runtime_dir, partial_interval=0.0, **settings),
            self._new_recognizer,
            socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
            PoolStatus.create(runtime_dir, 1),
        )
        self.worker, decoder_end = socket.socketpair()
        self.worker.setblocking(False)
        self.decoder.attach(decoder_end)
        self.reader = wire.worker_reader()
        self.buffers: dict[str, PcmWriter] = {}
        self.written: dict[str, int] = {}

    def _new_recognizer(self, rate: int) -> Recognizer:
        recognizer = FakeRecognizer(self.log)
        self.created.append(recognizer)
        return recognizer

    def send(self, record: wire.ToDecoder) -> None:
        data = wire.encode(record)
        while data:
            try:
                data = data[self.worker.send(data) :]
            except BlockingIOError:
                self.decoder.step(0)  # the decoder reads what fills the socket

    def received(self) -> list[wire.ToWorker]:
        records: list[wire.ToWorker] = []
        while True:
            try:
                data = self.worker.recv(65536)
            except BlockingIOError:
                return records
            records.extend(self.reader.feed(data))

    def open(self, stream_id: str, rate: int = RATE, *, partials: bool = False, force: bool = False) -> wire.ToWorker:
        self.buffers[stream_id] = PcmWriter(buffer_path(self.runtime_dir, stream_id), 120 * 48000 * 2)
        self.written[stream_id] = 0
        self.send(
            wire.Open(stream_id=stream_id, sample_rate=rate, partials=partials, end=0, finishing=False, force=force)
        )
        self.decoder.step(0)
        (reply,) = self.received()
        return reply

    def store(self, stream_id: str, pcm: bytes, rate: int = RATE, chunk: int | None = None) -> None:
        """Write `pcm` into the stream's buffer and announce it in chunks of `chunk` bytes."""
        offset = self.written[stream_id]
        self.buffers[stream_id].write(offset, pcm)
        for start in range(0, len(pcm), chunk or len(pcm) or 1):
            length = min(chunk or len(pcm), len(pcm) - start)
            self.send(wire.Data(stream_id=stream_id, sample_rate=rate, offset=offset + start, length=length))
        self.written[stream_id] = offset + len(pcm)

    def finish(self, stream_id: str) -> None:
        self.send(wire.Finish(stream_id=stream_id, end=self.written[stream_id]))

    def pump(self, until: type, stream_id: str, rounds: int = 10_000) -> tuple[wire.ToWorker, list[wire.ToWorker]]:
        """Run the loop until `stream_id` gets an `until` record; also return everything before it."""
        seen: list[wire.ToWorker] = []
        for _ in range(rounds):
            self.decoder.step(0)
            for record in self.received():
                if isinstance(record, until) and record.stream_id == stream_id:
                    return record, seen
                seen.append(record)
        raise AssertionError(f"no {until.__name__} for {stream_id} in {rounds} rounds: {seen}")


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(tmp_path)
    yield harness
    for writer in harness.buffers.values():
        writer.close()


def words(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{index}" for index in range(count)]


@pytest.mark.parametrize("chunk", [PIECE * 20, PIECE, 2 * 37, 1000], ids=["2s", "100ms", "74B", "1000B"])
def test_the_transcript_does_not_depend_on_how_the_audio_was_chunked(harness, chunk):
    assert isinstance(harness.open("s"), wire.Opened)
    harness.store("s", speech(*words("w", 20)) + b"tail", chunk=chunk)
    harness.finish("s")
    final, _ = harness.pump(wire.Final, "s")
    assert final.text == " ".join(words("w", 20)) + " tail"


def test_a_stream_far_ahead_of_the_decoder_gets_one_piece_per_round_not_the_process(harness):
    """One client sends 60 s at once and finishes; a normal stream opened after it is still served."""
    assert isinstance(harness.open("bulk"), wire.Opened)
    harness.store("bulk", speech(*words("b", 600)))
    harness.finish("bulk")
    harness.decoder.step(0)
    assert isinstance(harness.open("live"), wire.Opened)
    harness.store("live", speech(*words("l", 10)))
    harness.finish("live")
    final, _ = harness.pump(wire.Final, "live")
    assert final.text == " ".join(words("l", 10))
    bulk_pieces = sum(word.startswith("b") for word in harness.log)
    assert bulk_pieces <= 13, f"the bulk stream took {bulk_pieces} pieces while 10 of the live one were decoded"
    final, _ = harness.pump(wire.Final, "bulk")
    assert final.text == " ".join(words("b", 600))


def test_one_stream_far_behind_does_not_make_the_process_refuse_newcomers(harness):
    assert isinstance(harness.open("bulk"), wire.Opened)
    harness.store("bulk", speech(*words("b", 1200)))  # 120 s, 40x the backlog limit
    assert isinstance(harness.open("newcomer"), wire.Opened)


def test_several_streams_far_behind_make_the_process_refuse_new_streams(harness):
    for name in ("one", "two"):
        assert isinstance(harness.open(name), wire.Opened)
        harness.store(name, speech(*words(name, 300)))
    assert isinstance(harness.open("third"), wire.Refused)
    assert isinstance(harness.open("replayed", force=True), wire.Opened), (
        "a replay after a decoder died is never refused"
    )


def test_the_stream_limit_refuses_the_next_stream(tmp_path):
    harness = Harness(tmp_path, streams_limit=2)
    assert [type(harness.open(name)) for name in ("a", "b", "c")] == [wire.Opened, wire.Opened, wire.Refused]


def test_an_aborted_stream_is_forgotten_and_late_records_for_it_are_harmless(harness):
    assert isinstance(harness.open("s"), wire.Opened)
    harness.store("s", speech("x", "y"))
    harness.send(wire.Abort(stream_id="s"))
    harness.store("s", speech("z"))
    harness.finish("s")
    for _ in range(5):
        harness.decoder.step(0)
    assert harness.received() == []
    assert harness.decoder.streams == {}
    assert harness.decoder.slot.streams == 0


def test_a_worker_that_goes_away_takes_its_streams_with_it(harness):
    assert isinstance(harness.open("s"), wire.Opened)
    harness.store("s", speech(*words("w", 50)))
    harness.worker.close()
    for _ in range(3):
        harness.decoder.step(0)
    assert harness.decoder.streams == {}


def test_partials_only_for_streams_that_asked(harness):
    assert isinstance(harness.open("quiet"), wire.Opened)
    assert isinstance(harness.open("captioned", partials=True), wire.Opened)
    for name in ("quiet", "captioned"):
        harness.store(name, speech("hello", "there"))
        harness.finish(name)
    final, before = harness.pump(wire.Final, "captioned")
    assert final.text == "hello there"
    partials = [record for record in before if isinstance(record, wire.Partial)]
    assert partials and all(record.stream_id == "captioned" for record in partials)
    assert partials[-1].text == "hello there"


@pytest.mark.parametrize(
    "before",
    [speech("a", "b"), speech("a", ".", "b"), speech("a", "b", "."), speech(".")],
    ids=["no-endpoint", "endpoint-inside", "endpoint-at-the-end", "only-an-endpoint"],
)
@pytest.mark.parametrize("ended_by", ["finish", "abort"])
def test_a_reused_recogniser_decodes_the_next_stream_like_a_new_one(harness, before, ended_by):
    harness.open("before")
    harness.store("before", before)
    if ended_by == "finish":
        harness.finish("before")
        harness.pump(wire.Final, "before")
    else:
        for _ in range(5):
            harness.decoder.step(0)
        harness.send(wire.Abort(stream_id="before"))
    harness.open("next")
    harness.store("next", speech("c", "d"))
    harness.finish("next")
    final, _ = harness.pump(wire.Final, "next")
    assert final.text == "c d"
    assert len(harness.created) == 1, "the warm recogniser was reused"


def test_warm_recognisers_are_bounded_over_all_sample_rates(harness):
    for rate in SAMPLE_RATES:
        name = f"at{rate}"
        assert isinstance(harness.open(name, rate), wire.Opened)
        harness.store(name, speech("x", rate=rate), rate=rate)
        harness.finish(name)
        harness.pump(wire.Final, name)
    assert len(harness.created) == len(SAMPLE_RATES)
    assert harness.decoder.recognizers.count() == 4  # STT_STREAMS_PER_WORKER, not one per rate


@pytest.mark.parametrize("where", ["open", "data"])
def test_a_sample_rate_outside_the_accepted_set_fails_the_stream(harness, where):
    reply = harness.open("s", 12345 if where == "open" else RATE)
    if where == "data":
        assert isinstance(reply, wire.Opened)
        harness.store("s", speech("x", rate=12000), rate=12345)
        reply, _ = harness.pump(wire.Failed, "s")
    assert isinstance(reply, wire.Failed)
    assert "sample rate" in reply.error
    assert harness.decoder.streams == {}


def test_a_replay_that_overtakes_the_end_of_its_old_connection_starts_the_stream_afresh(harness):
    assert isinstance(harness.open("s"), wire.Opened)
    harness.store("s", speech("a", "b"))
    for _ in range(3):
        harness.decoder.step(0)
    harness.send(
        wire.Open(stream_id="s", sample_rate=RATE, partials=False, end=harness.written["s"], finishing=True, force=True)
    )
    final, _ = harness.pump(wire.Final, "s")
    assert final.text == "a b", "decoded once, from the start"
    assert harness.decoder.streams == {}
    assert len(harness.created) == 1, "the first attempt's warm recogniser was handed on, not leaked"
