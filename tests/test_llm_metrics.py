"""The service wires the OpenRouter client's call records into its Prometheus metrics."""

from __future__ import annotations

from prometheus_client import REGISTRY

from config import Settings
from llm.mock import MockProvider
from llm.openrouter import HttpCallRecord, OpenRouterProvider
from server.engines import build_provider, record_llm_call


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_every_http_call_feeds_calls_latency_and_tokens() -> None:
    before = {
        "failed": _sample("adb_llm_http_calls_total", task="replies", status_class="5xx"),
        "ok": _sample("adb_llm_http_calls_total", task="replies", status_class="2xx"),
        "timed": _sample("adb_llm_http_call_seconds_count", task="replies"),
        "prompt": _sample("adb_llm_tokens_total", kind="prompt"),
        "completion": _sample("adb_llm_tokens_total", kind="completion"),
    }
    record_llm_call(HttpCallRecord(task="replies", duration=0.2, status_class="5xx", status=503))
    record_llm_call(HttpCallRecord("replies", 0.1, "2xx", 200, prompt_tokens=100, completion_tokens=20))
    assert _sample("adb_llm_http_calls_total", task="replies", status_class="5xx") == before["failed"] + 1
    assert _sample("adb_llm_http_calls_total", task="replies", status_class="2xx") == before["ok"] + 1
    assert _sample("adb_llm_http_call_seconds_count", task="replies") == before["timed"] + 2
    assert _sample("adb_llm_tokens_total", kind="prompt") == before["prompt"] + 100
    assert _sample("adb_llm_tokens_total", kind="completion") == before["completion"] + 20


def test_a_key_selects_the_openrouter_client_with_the_metrics_observer() -> None:
    settings = Settings(_env_file=None, openrouter_api_key="sk-test-engines-1234", openrouter_model="test/m")
    provider = build_provider(settings)
    assert isinstance(provider, OpenRouterProvider)
    assert provider.observer is record_llm_call
    assert provider.model == "test/m"
    assert isinstance(build_provider(Settings(_env_file=None, openrouter_api_key=None)), MockProvider)
