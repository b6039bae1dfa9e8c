"""The one place where real and mock engines are chosen, from the settings, at worker start-up."""

from __future__ import annotations

from collections.abc import Callable

from config import Settings
from llm.interface import SuggestionProvider
from llm.mock import MockProvider
from llm.openrouter import HttpCallRecord, OpenRouterProvider
from server import metrics
from server.generation import GenerationManager, GenerationPolicy
from stt_pool.client import PoolTranscriber
from stt_pool.interface import Transcriber
from stt_pool.mock import MockTranscriber


def build_transcriber(settings: Settings, on_fatal: Callable[[str], None]) -> Transcriber:
    """The Vosk pool when a model directory exists; `on_fatal` stops the service if the pool cannot run."""
    if settings.stt_mode == "vosk":
        return PoolTranscriber(
            runtime_dir=settings.pool_dir,
            workers=settings.stt_workers,
            default_rate=settings.vosk_sample_rate,
            max_seconds=settings.max_recording_seconds,
            timeout=settings.stt_timeout,
            model_path=settings.vosk_model_path,
            on_fatal=on_fatal,
        )
    return MockTranscriber(settings.vosk_sample_rate, settings.max_recording_seconds)


def build_provider(settings: Settings) -> SuggestionProvider:
    if settings.llm_mode == "openrouter":
        assert settings.openrouter_api_key is not None  # llm_mode says so
        return OpenRouterProvider(
            api_key=settings.openrouter_api_key.get_secret_value(),
            base_url=settings.openrouter_base_url,
            model=settings.openrouter_model,
            temperature=settings.openrouter_temperature,
            max_tokens=settings.openrouter_max_tokens,
            timeout=settings.llm_timeout,
            max_retries=settings.llm_max_retries,
            prompt_char_budget=settings.llm_prompt_char_budget,
            site_url=settings.openrouter_site_url,
            app_name=settings.openrouter_app_name,
            observer=record_llm_call,
        )
    return MockProvider(settings.mock_llm_delay_ms / 1000)


def build_generations(settings: Settings, provider: SuggestionProvider) -> GenerationManager:
    policy = GenerationPolicy(
        speculative_replies=settings.speculative_replies,
        opinion_prediction_for_all=settings.opinion_prediction,
        session_rate_per_minute=settings.llm_session_rate_per_minute,
        session_burst=settings.llm_session_burst,
        max_concurrent=settings.llm_max_concurrent,
    )
    return GenerationManager(provider, settings.llm_timeout, policy)


def record_llm_call(record: HttpCallRecord) -> None:
    """Feed every HTTP call of the OpenRouter client (latency, outcome, reported tokens) to the metrics."""
    metrics.LLM_HTTP_CALLS.labels(record.task, record.status_class).inc()
    metrics.LLM_HTTP_LATENCY.labels(record.task).observe(record.duration)
    if record.prompt_tokens:
        metrics.LLM_TOKENS.labels("prompt").inc(record.prompt_tokens)
    if record.completion_tokens:
        metrics.LLM_TOKENS.labels("completion").inc(record.completion_tokens)
