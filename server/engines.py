"""The one place where real and mock engines are chosen, from the settings, at worker start-up."""

from __future__ import annotations

from config import Settings
from llm.interface import SuggestionProvider
from llm.mock import MockProvider
from stt_pool.interface import Transcriber
from stt_pool.mock import MockTranscriber


def build_transcriber(settings: Settings) -> Transcriber:
    if settings.stt_mode == "vosk":
        from stt_pool.client import PoolTranscriber

        return PoolTranscriber.from_settings(settings)
    return MockTranscriber(settings.vosk_sample_rate, settings.max_recording_seconds)


def build_provider(settings: Settings) -> SuggestionProvider:
    if settings.llm_mode == "openrouter":
        from llm.openrouter import OpenRouterProvider

        return OpenRouterProvider.from_settings(settings)
    return MockProvider(settings.mock_llm_delay_ms / 1000)
