"""A decoding process: one recogniser per stream, fed while the person is still speaking.

The process is forked from the supervisor after the model is loaded, so the model's pages are
shared copy-on-write. It serves Sanic workers on an inherited listening Unix socket. Audio is
read from each stream's shared-memory buffer and fed in fixed pieces (100 ms by default) at
fixed offsets from the start of the recording, whatever sizes the client sent: for a given PCM
stream the transcript does not depend on chunking, timing, pool size or which process ran it.
At `finish` only the tail is left to decode.

Decoder time is shared fairly: every round feeds one piece to each stream that has one, so a
client that sends two minutes of audio at once only ever takes one share of the process.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from stt_pool import wire
from stt_pool.buffers import PcmReader
from stt_pool.interface import SAMPLE_RATES
from stt_pool.layout import buffer_path
from stt_pool.status import PoolStatus, SlotState
from stt_pool.text import join_segments

log = logging.getLogger("stt_pool.decoder")

IDLE_WAIT = 0.5


class Recognizer(Protocol):
    """The part of `vosk.KaldiRecognizer` a decoder uses (Vosk's method names)."""

    def AcceptWaveform(self, data: bytes) -> int: ...
    def Result(self) -> str: ...
    def PartialResult(self) -> str: ...
    def FinalResult(self) -> str: ...


RecognizerFactory = Callable[[int], Recognizer]


@dataclass
class DecoderConfig:
    index: int
    runtime_dir: Path
    streams_limit: int
    max_backlog_ms: int
    piece_ms: int
    partial_interval: float


@dataclass
class Stream:
    stream_id: str
    peer: socket.socket
    reader: PcmReader
    sample_rate: int
    partials: bool
    end: int = 0
    fed: int = 0
    finishing: bool = False
    finished: bool = False
    recognizer: Recognizer | None = None
    # The last piece fed made Vosk report an endpoint (see `finalize`).
    at_endpoint: bool = False
    segments: list[str] = field(default_factory=list)
    last_partial: str = ""
    last_partial_at: float = 0.0
    cpu_seconds: float = 0.0

    def piece_bytes(self, piece_ms: int) -> int:
        return self.sample_rate * piece_ms // 1000 * 2

    def backlog_ms(self) -> int:
        return (self.end - self.fed) * 1000 // (2 * self.sample_rate)


def finalize(recognizer: Recognizer, at_endpoint: bool, final_result_taken: bool) -> bool:
    """Bring a used recogniser to Vosk's "finalized" state; False if it could not be (drop it).

    Only from that state does Vosk start the next stream with a new feature pipeline (and
    iVector state) and a new decoder, so that the recogniser decodes exactly like a new one.
    `FinalResult` gets it there -- except right after an endpoint: when the last piece fed ended
    an utterance (`Result` taken), `FinalResult` returns nothing and changes nothing, and the
    next stream would continue the old feature pipeline. One empty `AcceptWaveform` starts a
    (still empty) utterance again, which `FinalResult` then finalizes; its text is discarded.
    """
    if at_endpoint:
        if recognizer.AcceptWaveform(b""):
            return False
    elif final_result_taken:
        return True
    recognizer.FinalResult()
    return True


class Recognizers:
    """Recognisers kept warm between streams, at most `keep` in all (least recently used go).

    A new recogniser expands its decoding graph lazily (the lookahead composition of the small
    models), which costs about a second of CPU on its first utterance, so a short first message
    would wait for it. A finalized recogniser (see `finalize`) starts the next stream with a new
    feature pipeline and decoder on the same graph: it decodes exactly like a new one, only
    faster. The bound is over all sample rates together: each rate has its own recognisers
    (and resampler), and an unbounded set would grow the process with every rate seen.
    """

    def __init__(self, factory: RecognizerFactory, keep: int) -> None:
        self.factory = factory
        self.keep = keep
        self.idle: OrderedDict[int, list[Recognizer]] = OrderedDict()

    def take(self, sample_rate: int) -> Recognizer:
        idle = self.idle.get(sample_rate)
        if idle:
            recognizer = idle.pop()
            if not idle:
                del self.idle[sample_rate]
            return recognizer
        return self.factory(sample_rate)

    def give_back(self, sample_rate: int, recognizer: Recognizer) -> None:
        """`recognizer` must be finalized (see `finalize`)."""
        self.idle.setdefault(sample_rate, []).append(recognizer)
        self.idle.move_to_end(sample_rate)
        while self.count() > self.keep:
            oldest = next(iter(self.idle))
            self.idle[oldest].pop(0)
            if not self.idle[oldest]:
                del self.idle[oldest]

    def count(self) -> int:
        return sum(len(idle) for idle in self.idle.values())


class Decoder:
    def __init__(
        self, config: DecoderConfig, recognizers: RecognizerFactory, listener: socket.socket, status: PoolStatus
    ) -> None:
        self.config = config
        self.recognizers = Recognizers(recognizers, config.streams_limit)
        self.listener = listener
        self.slot = status.slots[config.index]
        self.selector = selectors.DefaultSelector()
        self.readers: dict[socket.socket, wire.RecordReader[wire.ToDecoder]] = {}
        self.streams: dict[str, Stream] = {}
        self.running = True

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        parent = os.getppid()
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.slot.pid = os.getpid()
        self.slot.streams = 0
        self.slot.state = SlotState.READY
        log.info("decoder ready", extra={"decoder": self.config.index})
        while self.running and os.getppid() == parent:
            self.step(IDLE_WAIT)
        self.slot.state = SlotState.DEAD

    def step(self, idle_wait: float) -> None:
        """Read what the workers sent (waiting up to `idle_wait` if there is nothing to decode),
        then decode one round."""
        busy = any(self._has_work(stream) for stream in self.streams.values())
        for key, _ in self.selector.select(0 if busy else idle_wait):
            if key.fileobj is self.listener:
                self.attach(self.listener.accept()[0])
            else:
                self._receive(key.fileobj)  # type: ignore[arg-type]
        self._work_round()
        self._publish()

    def stop(self, *_: object) -> None:
        self.running = False

    def attach(self, peer: socket.socket) -> None:
        """Serve a Sanic worker's connection."""
        self.readers[peer] = wire.decoder_reader()
        self.selector.register(peer, selectors.EVENT_READ)

    def _receive(self, peer: socket.socket) -> None:
        try:
            data = peer.recv(65536)
            records = self.readers[peer].feed(data) if data else None
        except (OSError, ValueError):
            records = None
        if records is None:
            self._drop_peer(peer)
            return
        for record in records:
            self._handle(peer, record)

    def _drop_peer(self, peer: socket.socket) -> None:
        """A Sanic worker went away: its streams have nobody to deliver to."""
        self.selector.unregister(peer)
        self.readers.pop(peer, None)
        for stream in [s for s in self.streams.values() if s.peer is peer]:
            self._close(stream)
        peer.close()

    def _send(self, peer: socket.socket, record: wire.ToWorker) -> None:
        try:
            peer.sendall(wire.encode(record))
        except OSError:
            log.info("worker connection lost while sending", extra={"decoder": self.config.index})

    # -- control records ------------------------------------------------------------------------

    def _handle(self, peer: socket.socket, record: wire.ToDecoder) -> None:
        if isinstance(record, wire.Open):
            self._open(peer, record)
            return
        stream = self.streams.get(record.stream_id)
        if stream is None:
            return  # aborted or finished already; late records are harmless
        if isinstance(record, wire.Data):
            if not stream.fed and record.sample_rate != stream.sample_rate:
                if record.sample_rate not in SAMPLE_RATES:
                    self._send(peer, wire.Failed(stream_id=stream.stream_id, error="unsupported sample rate"))
                    self._close(stream)
                    return
                stream.sample_rate = record.sample_rate
            stream.end = max(stream.end, record.offset + record.length)
        elif isinstance(record, wire.Finish):
            stream.end = max(stream.end, record.end)
            stream.finishing = True
        elif isinstance(record, wire.Abort):
            self._close(stream)

    def _open(self, peer: socket.socket, record: wire.Open) -> None:
        saturated = len(self.streams) >= self.config.streams_limit or self._admission_backlog_ms() >= (
            self.config.max_backlog_ms
        )
        if saturated and not record.force:
            self._send(peer, wire.Refused(stream_id=record.stream_id))
            return
        if record.sample_rate not in SAMPLE_RATES:
            self._send(peer, wire.Failed(stream_id=record.stream_id, error="unsupported sample rate"))
            return
        previous = self.streams.get(record.stream_id)
        if previous is not None:
            # A replay over a new connection overtook the end of the old one: decode from the start.
            self._close(previous)
        try:
            reader = PcmReader(buffer_path(self.config.runtime_dir, record.stream_id))
        except OSError as error:
            self._send(peer, wire.Failed(stream_id=record.stream_id, error=f"buffer: {error.strerror}"))
            return
        self.streams[record.stream_id] = Stream(
            stream_id=record.stream_id,
            peer=peer,
            reader=reader,
            sample_rate=record.sample_rate,
            partials=record.partials,
            end=record.end,
            finishing=record.finishing,
        )
        self._send(peer, wire.Opened(stream_id=record.stream_id))

    # -- decoding -------------------------------------------------------------------------------

    def _has_work(self, stream: Stream) -> bool:
        return stream.finishing or stream.end - stream.fed >= stream.piece_bytes(self.config.piece_ms)

    def _work_round(self) -> None:
        """One piece for every stream that has one, finishing streams first (someone waits for them).

        One piece each, however much a stream has waiting: a stream far ahead of the decoder
        (audio sent faster than real time) takes one share of every round, not the process.
        """
        for stream in sorted(self.streams.values(), key=lambda s: not s.finishing):
            piece = stream.piece_bytes(self.config.piece_ms)
            if stream.end - stream.fed >= piece:
                self._feed(stream, piece)
                self._maybe_partial(stream)
            elif stream.finishing:
                self._finish(stream)

    def _feed(self, stream: Stream, size: int) -> None:
        started = time.process_time()
        if stream.recognizer is None:
            stream.recognizer = self.recognizers.take(stream.sample_rate)
        pcm = stream.reader.read(stream.fed, stream.fed + size)
        stream.at_endpoint = bool(stream.recognizer.AcceptWaveform(pcm))
        if stream.at_endpoint:
            stream.segments.append(json.loads(stream.recognizer.Result())["text"])
        stream.fed += len(pcm)
        stream.cpu_seconds += time.process_time() - started
        self.slot.heartbeat = time.time()  # a long backlog is work, not a hang

    def _maybe_partial(self, stream: Stream) -> None:
        now = time.monotonic()
        if (
            not stream.partials
            or stream.recognizer is None
            or now - stream.last_partial_at < self.config.partial_interval
        ):
            return
        # Right after an endpoint (and before any audio) Vosk answers `{"text": ""}`: nothing pending.
        current = json.loads(stream.recognizer.PartialResult()).get("partial", "")
        text = join_segments([*stream.segments, current])
        if text and text != stream.last_partial:
            stream.last_partial, stream.last_partial_at = text, now
            self._send(stream.peer, wire.Partial(stream_id=stream.stream_id, text=text))

    def _finish(self, stream: Stream) -> None:
        if stream.end > stream.fed:
            self._feed(stream, stream.end - stream.fed)
        if stream.recognizer is not None:
            started = time.process_time()
            stream.segments.append(json.loads(stream.recognizer.FinalResult())["text"])
            stream.cpu_seconds += time.process_time() - started
        stream.finished = True
        self._send(
            stream.peer,
            wire.Final(stream_id=stream.stream_id, text=join_segments(stream.segments), cpu_seconds=stream.cpu_seconds),
        )
        self.slot.decoded_ms += stream.fed * 1000 // (2 * stream.sample_rate)
        self.slot.decode_cpu_ms += int(stream.cpu_seconds * 1000)
        self.slot.streams_done += 1
        self._close(stream)

    def _close(self, stream: Stream) -> None:
        """Forget the stream; its recogniser goes back warm if it is as good as a new one."""
        self.streams.pop(stream.stream_id, None)
        stream.reader.close()
        if stream.recognizer is not None and finalize(stream.recognizer, stream.at_endpoint, stream.finished):
            self.recognizers.give_back(stream.sample_rate, stream.recognizer)
        stream.recognizer = None

    def _admission_backlog_ms(self) -> int:
        """How far behind the people talking this process is, as a new stream would feel it.

        Under round-robin one stream, however far ahead of the decoder its client is, delays the
        others by one piece a round; its backlog counts at most half the limit, so it alone cannot
        make the process refuse newcomers (its own backlog is bounded by the recording limit),
        while two streams that far behind can.
        """
        share = self.config.max_backlog_ms // 2
        return sum(min(stream.backlog_ms(), share) for stream in self.streams.values())

    def _publish(self) -> None:
        self.slot.streams = len(self.streams)
        self.slot.backlog_ms = sum(stream.backlog_ms() for stream in self.streams.values())
        self.slot.heartbeat = time.time()


def run_decoder(config: DecoderConfig, model: Any, listener: socket.socket, status: PoolStatus) -> None:
    """Entry point in the forked child."""
    import vosk

    vosk.SetLogLevel(-1)
    decoder = Decoder(config, lambda rate: vosk.KaldiRecognizer(model, rate), listener, status)
    signal.signal(signal.SIGTERM, decoder.stop)
    # Ctrl-C reaches the whole process group; the supervisor decides when decoders stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    decoder.run()
