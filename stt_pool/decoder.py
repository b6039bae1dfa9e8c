"""A decoding process: one Vosk recogniser per stream, fed while the person is still speaking.

The process is forked from the supervisor after the model is loaded, so the model's pages are
shared copy-on-write. It serves Sanic workers on an inherited listening Unix socket. Audio is
read from each stream's shared-memory buffer and fed in fixed pieces (100 ms by default) at
fixed offsets from the start of the recording, whatever sizes the client sent: for a given PCM
stream the transcript does not depend on chunking, timing, pool size or which process ran it.
At `finish` only the tail is left to decode.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import signal
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stt_pool.buffers import PcmReader, buffer_path
from stt_pool.status import PoolStatus, SlotState
from stt_pool.text import join_segments
from stt_pool.wire import Record, RecordReader, pack

log = logging.getLogger("stt_pool.decoder")

IDLE_WAIT = 0.5
# How much of a finishing stream's backlog one round decodes before the sockets are read again.
FINISH_PIECES_PER_ROUND = 20


@dataclass
class DecoderConfig:
    index: int
    buffer_dir: Path
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
    recognizer: Any = None
    segments: list[str] = field(default_factory=list)
    last_partial: str = ""
    last_partial_at: float = 0.0
    cpu_seconds: float = 0.0

    def piece_bytes(self, piece_ms: int) -> int:
        return self.sample_rate * piece_ms // 1000 * 2


class Recognizers:
    """Recognisers kept warm between streams, per sample rate.

    A new recogniser expands its decoding graph lazily (the lookahead composition of the small
    models), which costs about a second of CPU on its first utterance, so a short first message
    would wait for it. After FinalResult Vosk starts the next utterance with a new feature pipeline
    and decoder on the same graph: a reused recogniser decodes exactly like a new one, only faster.
    """

    def __init__(self, model: Any, keep: int) -> None:
        self.model = model
        self.keep = keep
        self.idle: dict[int, list[Any]] = {}

    def take(self, sample_rate: int) -> Any:
        idle = self.idle.get(sample_rate)
        if idle:
            return idle.pop()
        import vosk

        return vosk.KaldiRecognizer(self.model, sample_rate)

    def give_back(self, sample_rate: int, recognizer: Any) -> None:
        """`recognizer` must have just returned its FinalResult (only that fully resets it)."""
        idle = self.idle.setdefault(sample_rate, [])
        if len(idle) < self.keep:
            idle.append(recognizer)


class Decoder:
    def __init__(self, config: DecoderConfig, model: Any, listener: socket.socket, status: PoolStatus) -> None:
        self.config = config
        self.model = model
        self.recognizers = Recognizers(model, config.streams_limit)
        self.listener = listener
        self.status = status
        self.slot = status.slots[config.index]
        self.selector = selectors.DefaultSelector()
        self.readers: dict[socket.socket, RecordReader] = {}
        self.streams: dict[str, Stream] = {}
        self.parent = os.getppid()
        self.running = True

    # -- loop ---------------------------------------------------------------------------------

    def run(self) -> None:
        import vosk

        vosk.SetLogLevel(-1)
        self.selector.register(self.listener, selectors.EVENT_READ)
        self.slot.pid = os.getpid()
        self.slot.streams = 0
        self.slot.state = SlotState.READY
        log.info("decoder ready", extra={"decoder": self.config.index})
        while self.running and os.getppid() == self.parent:
            busy = any(self._has_work(stream) for stream in self.streams.values())
            for key, _ in self.selector.select(0 if busy else IDLE_WAIT):
                if key.fileobj is self.listener:
                    self._accept()
                else:
                    self._receive(key.fileobj)  # type: ignore[arg-type]
            self._work_round()
            self._publish()
        self.slot.state = SlotState.DEAD

    def stop(self, *_: object) -> None:
        self.running = False

    def _accept(self) -> None:
        peer, _ = self.listener.accept()
        self.readers[peer] = RecordReader()
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

    def _send(self, peer: socket.socket, record: Record) -> None:
        try:
            peer.sendall(pack(record))
        except OSError:
            log.info("worker connection lost while sending", extra={"decoder": self.config.index})

    # -- control records ------------------------------------------------------------------------

    def _handle(self, peer: socket.socket, record: Record) -> None:
        op = record.get("op")
        stream_id = str(record.get("sid", ""))
        if op == "open":
            self._open(peer, stream_id, record)
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            return  # aborted or finished already; late records are harmless
        if op == "data":
            if not stream.fed:
                stream.sample_rate = int(record["rate"])
            stream.end = max(stream.end, int(record["off"]) + int(record["len"]))
        elif op == "finish":
            stream.end = max(stream.end, int(record["end"]))
            stream.finishing = True
        elif op == "abort":
            self._close(stream)

    def _open(self, peer: socket.socket, stream_id: str, record: Record) -> None:
        saturated = len(self.streams) >= self.config.streams_limit or self._backlog_ms() > self.config.max_backlog_ms
        if saturated and not record.get("force"):
            self._send(peer, {"op": "refused", "sid": stream_id, "reason": "overloaded"})
            return
        try:
            reader = PcmReader(buffer_path(self.config.buffer_dir, stream_id))
        except OSError as error:
            self._send(peer, {"op": "failed", "sid": stream_id, "error": f"buffer: {error.strerror}"})
            return
        self.streams[stream_id] = Stream(
            stream_id=stream_id,
            peer=peer,
            reader=reader,
            sample_rate=int(record["rate"]),
            partials=bool(record.get("partials")),
            end=int(record.get("end", 0)),
            finishing=bool(record.get("finishing")),
        )
        self._send(peer, {"op": "opened", "sid": stream_id})

    # -- decoding -------------------------------------------------------------------------------

    def _has_work(self, stream: Stream) -> bool:
        return stream.finishing or stream.end - stream.fed >= stream.piece_bytes(self.config.piece_ms)

    def _work_round(self) -> None:
        """Finishing streams go first (someone is waiting for them); the others advance one piece."""
        for stream in sorted(self.streams.values(), key=lambda s: not s.finishing):
            if stream.finishing:
                self._advance_finishing(stream)
            elif self._has_work(stream):
                self._feed(stream, stream.piece_bytes(self.config.piece_ms))
                self._maybe_partial(stream)

    def _feed(self, stream: Stream, size: int) -> None:
        started = time.process_time()
        if stream.recognizer is None:
            stream.recognizer = self.recognizers.take(stream.sample_rate)
        pcm = stream.reader.read(stream.fed, stream.fed + size)
        if stream.recognizer.AcceptWaveform(pcm):
            stream.segments.append(json.loads(stream.recognizer.Result())["text"])
        stream.fed += len(pcm)
        stream.cpu_seconds += time.process_time() - started
        self.slot.heartbeat = time.time()  # a long backlog is work, not a hang

    def _maybe_partial(self, stream: Stream) -> None:
        now = time.monotonic()
        if not stream.partials or now - stream.last_partial_at < self.config.partial_interval:
            return
        current = json.loads(stream.recognizer.PartialResult())["partial"]
        text = join_segments([*stream.segments, current])
        if text and text != stream.last_partial:
            stream.last_partial, stream.last_partial_at = text, now
            self._send(stream.peer, {"op": "partial", "sid": stream.stream_id, "text": text})

    def _advance_finishing(self, stream: Stream) -> None:
        piece = stream.piece_bytes(self.config.piece_ms)
        for _ in range(FINISH_PIECES_PER_ROUND):
            if stream.end - stream.fed < piece:
                self._finish(stream)
                return
            self._feed(stream, piece)

    def _finish(self, stream: Stream) -> None:
        if stream.end > stream.fed:
            self._feed(stream, stream.end - stream.fed)
        if stream.recognizer is not None:
            started = time.process_time()
            stream.segments.append(json.loads(stream.recognizer.FinalResult())["text"])
            stream.cpu_seconds += time.process_time() - started
        stream.finished = True
        audio_seconds = stream.fed / (2 * stream.sample_rate)
        self._send(
            stream.peer,
            {
                "op": "final",
                "sid": stream.stream_id,
                "text": join_segments(stream.segments),
                "audio_seconds": audio_seconds,
                "cpu_seconds": stream.cpu_seconds,
            },
        )
        self.slot.decoded_ms += int(audio_seconds * 1000)
        self.slot.decode_cpu_ms += int(stream.cpu_seconds * 1000)
        self.slot.streams_done += 1
        self._close(stream)

    def _close(self, stream: Stream) -> None:
        """Forget the stream; its recogniser goes back warm (after a final result, which resets it)."""
        self.streams.pop(stream.stream_id, None)
        stream.reader.close()
        if stream.recognizer is not None:
            if not stream.finished:
                stream.recognizer.FinalResult()
            self.recognizers.give_back(stream.sample_rate, stream.recognizer)
            stream.recognizer = None

    def _backlog_ms(self) -> int:
        """Audio received but not decoded yet: how far this process is behind the people talking."""
        return sum((s.end - s.fed) * 1000 // (2 * s.sample_rate) for s in self.streams.values())

    def _publish(self) -> None:
        self.slot.streams = len(self.streams)
        self.slot.backlog_ms = self._backlog_ms()
        self.slot.heartbeat = time.time()


def run_decoder(config: DecoderConfig, model: Any, listener: socket.socket, status: PoolStatus) -> None:
    """Entry point in the forked child."""
    decoder = Decoder(config, model, listener, status)
    signal.signal(signal.SIGTERM, decoder.stop)
    # Ctrl-C reaches the whole process group; the supervisor decides when decoders stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    decoder.run()
