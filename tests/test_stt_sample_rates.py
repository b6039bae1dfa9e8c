"""Recordings come at one of a fixed set of sample rates: each rate a decoder serves costs it
recognisers and a resampler, so arbitrary rates would grow it without bound."""

from __future__ import annotations

import base64

import orjson
import pytest

from config import ConfigError, load_settings
from server.protocol import AudioStream, ErrorCode, Limits, ProtocolError, parse_client_event
from stt_pool.interface import SAMPLE_RATES

LIMITS = Limits(text_chars=1000, label_chars=100, list_items=10, history_messages=10)


def audio_frame(sample_rate: int) -> bytes:
    data = {"session_id": "s", "audio_chunk": base64.b64encode(bytes(64)).decode(), "sample_rate": sample_rate}
    return orjson.dumps({"type": "audio_stream", "data": data})


@pytest.mark.parametrize("rate", SAMPLE_RATES)
def test_every_accepted_rate_passes_validation(rate):
    _, data = parse_client_event(audio_frame(rate), LIMITS)
    assert isinstance(data, AudioStream) and data.sample_rate == rate


@pytest.mark.parametrize("rate", [8001, 12000, 16001, 44099, 47999])
def test_a_rate_inside_the_range_but_outside_the_set_is_invalid_event_data(rate):
    with pytest.raises(ProtocolError) as raised:
        parse_client_event(audio_frame(rate), LIMITS)
    assert raised.value.code is ErrorCode.INVALID_EVENT_DATA
    assert "sample_rate" in str(raised.value.details)


@pytest.mark.parametrize("variable", ["VOSK_SAMPLE_RATE", "AUDIO_SAMPLE_RATE"])
def test_a_default_rate_outside_the_set_stops_start_up(monkeypatch, tmp_path, variable):
    monkeypatch.setenv(variable, "12000")
    with pytest.raises(ConfigError, match=f"{variable}.*must be one of 8000, 11025"):
        load_settings(env_file=tmp_path / "absent.env")
