"""Service metrics, declared once. Every Sanic worker writes to them; `GET /metrics` aggregates.

prometheus_client runs in multiprocess mode (PROMETHEUS_MULTIPROC_DIR is set by `server.__main__`
before any worker starts), so counters stay correct with several Sanic workers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0)
LLM_BUCKETS = (0.005, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)

CONNECTIONS = Gauge("adb_websocket_connections", "Open WebSocket connections", multiprocess_mode="livesum")
SESSIONS = Gauge("adb_sessions", "Sessions attached to an open connection", multiprocess_mode="livesum")
# Sessions without a connection live in the store (resumable until SESSION_RESUME_WINDOW ends):
# these count how they get there and back.
SESSION_DETACHES = Counter("adb_session_detaches", "Sessions left detached (resumable) by a dropped connection")
SESSION_RESUMES = Counter("adb_session_resumes", "session_resume requests, by outcome", ["outcome"])
SESSION_TAKEOVERS = Counter(
    "adb_session_takeovers", "Sessions a connection lost to a session_resume on another connection"
)
RECORDINGS = Gauge("adb_open_recordings", "Recordings currently open", multiprocess_mode="livesum")
EVENTS = Counter("adb_client_events", "Client events received, by type", ["type"])
ERRORS = Counter("adb_errors", "Error events sent to clients, by code", ["code"])
AUDIO_RECEIVED = Counter("adb_audio_received_seconds", "Seconds of audio received from clients")
AUDIO_DECODED = Counter("adb_audio_decoded_seconds", "Seconds of audio decoded to a final transcript")
STT_FINAL_LATENCY = Histogram(
    "adb_stt_final_latency_seconds", "message_end to final transcript", buckets=LATENCY_BUCKETS
)
STT_RTF = Histogram("adb_stt_real_time_factor", "Decoder CPU seconds per second of audio", buckets=RTF_BUCKETS)
LLM_LATENCY = Histogram("adb_llm_request_seconds", "LLM generation latency", ["task"], buckets=LLM_BUCKETS)
LLM_OUTCOMES = Counter("adb_llm_requests", "LLM generations by task and outcome", ["task", "outcome"])
LLM_TOKENS = Counter("adb_llm_tokens", "Tokens reported by the provider", ["kind"])
LLM_HTTP_CALLS = Counter(
    "adb_llm_http_calls", "HTTP calls to the LLM provider by task and status class", ["task", "status_class"]
)
LLM_HTTP_LATENCY = Histogram(
    "adb_llm_http_call_seconds", "Duration of each HTTP call to the LLM provider", ["task"], buckets=LLM_BUCKETS
)
LLM_SPECULATION = Counter(
    "adb_llm_speculation",
    "Reply generations served from replies prepared with the keywords (hit) or asked of the provider (miss)",
    ["result"],
)
LLM_SPECULATIVE_CALLS = Counter(
    "adb_llm_speculative_calls", "Provider requests for keywords together with replies prepared for each"
)
LLM_REFUSED = Counter(
    "adb_llm_refused", "Generations refused with RATE_LIMITED before reaching the provider, by reason", ["reason"]
)
