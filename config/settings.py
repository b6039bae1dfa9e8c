"""Service settings: read once from the environment and an optional `.env` file, validated, then handed down.

The environment wins over `.env`. An invalid value stops start-up with one line that names the
variable and says what it accepts (see `load_settings`).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import orjson
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from stt_pool.interface import SAMPLE_RATES

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SERVICE_NAME = "ai-dialogue-backend"
VERSION = "1.0.0"
# A recording's wall-clock limit beyond its audio limit: time to send the last chunks and message_end.
RECORDING_WALL_MARGIN_SECONDS = 30.0

_SIZE = re.compile(r"(\d+)\s*([kmg]?)(?:i?b)?", re.IGNORECASE)
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s]+")


class ConfigError(Exception):
    """Raised with a one-line, human-readable explanation of the first invalid setting."""


def _default_state_dir() -> Path:
    # systemd's StateDirectory= exports STATE_DIRECTORY (colon-separated when it names several).
    systemd = os.environ.get("STATE_DIRECTORY", "")
    return Path(systemd.split(":")[0]) if systemd else PROJECT_ROOT / "state"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        frozen=True,
    )

    # LLM provider (OpenRouter or any OpenAI-compatible endpoint).
    openrouter_api_key: SecretStr | None = None
    openrouter_base_url: str = "https://openrouter.ai/api/v1"
    openrouter_model: str = "anthropic/claude-3-haiku"
    openrouter_temperature: float = Field(0.7, ge=0.0, le=2.0)
    openrouter_max_tokens: int = Field(800, ge=16, le=32000)
    openrouter_site_url: str = ""
    openrouter_app_name: str = "AI Dialogue Assistant"
    llm_timeout: float = Field(30.0, gt=0, le=600)
    llm_max_retries: int = Field(2, ge=0, le=10)
    # One budget for the whole prompt (system prompt, task, scenario, opinion, modifications, history);
    # the former history-only LLM_HISTORY_CHAR_BUDGET still sets it rather than being ignored.
    llm_prompt_char_budget: int = Field(
        12000, ge=2000, le=200_000, validation_alias=AliasChoices("llm_prompt_char_budget", "llm_history_char_budget")
    )
    # Provider calls: a token bucket per session (refilled at the rate, holding at most the burst)
    # and a cap on the calls in flight per worker; beyond either a generation is RATE_LIMITED.
    llm_session_rate_per_minute: float = Field(20.0, gt=0, le=6000)
    llm_session_burst: int = Field(6, ge=1, le=1000)
    llm_max_concurrent: int = Field(64, ge=1, le=10_000)
    # Prepare the replies for each offered keyword with the keywords themselves (one provider call).
    speculative_replies: bool = True
    # Send `opinion_prediction_response` after every `user_selected_response`, to every client.
    opinion_prediction: bool = False
    # Latency of the mock provider: about what a real provider takes for a short answer, so the mock
    # behaves like the real thing (loading states show; a message_start right after conversation_start
    # cancels the opinions, as clients written against a real provider expect). The tests set 0.
    mock_llm_delay_ms: int = Field(2000, ge=0, le=600_000)

    # Speech recognition.
    vosk_model_path: Path = PROJECT_ROOT / "model" / "vosk-model"
    vosk_sample_rate: int = Field(16000, ge=8000, le=48000)
    stt_timeout: float = Field(30.0, gt=0, le=600)
    stt_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256)
    stt_streams_per_worker: int = Field(4, ge=1, le=256)
    # A decoding process that is this far behind real time takes no new recording (STT_OVERLOADED).
    stt_max_backlog_ms: int = Field(3000, ge=100, le=600_000)
    stt_piece_ms: int = Field(100, ge=10, le=1000)
    partial_interval_ms: int = Field(200, ge=50, le=10_000)
    max_recording_seconds: float = Field(120.0, gt=0, le=3600)
    # Seed-era switch: false uses the mock transcriber even when a model is installed.
    use_real_vosk: bool = True

    # Audio as clients send it: the format assumed for `audio_stream` chunks that do not declare
    # `sample_rate`/`channels` (the sample rate defaults to VOSK_SAMPLE_RATE, as PROTOCOL.md says).
    audio_sample_rate: int | None = Field(None, ge=8000, le=48000)
    audio_channels: int = Field(1, ge=1, le=2)

    # HTTP / WebSocket server.
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1, le=64)
    # Seed-era name of WORKERS; setting both to different values is an error.
    max_workers: int | None = Field(None, ge=1, le=64)
    debug: bool = False
    websocket_timeout: float = Field(300.0, gt=0)
    # The largest legitimate frame is one second of 48 kHz stereo audio: about 260 KB of base64.
    max_message_bytes: int = Field(512 * 1024, ge=1024, le=64 * 1024 * 1024)
    # A client that has not read what it was sent for this long is closed (its recordings released).
    websocket_send_timeout: float = Field(20.0, gt=0, le=600)
    # The server pings every WEBSOCKET_PING_INTERVAL s and closes (1011) a connection whose pong has not
    # come within WEBSOCKET_PING_TIMEOUT s. Frames are handled in order, so a pong can wait behind a
    # message_end that waits up to STT_TIMEOUT for its transcript: the timeout must be longer than that.
    websocket_ping_interval: float = Field(20.0, gt=0, le=3600)
    websocket_ping_timeout: float = Field(45.0, gt=0, le=3600)
    # High enough for many phones behind one carrier NAT; far below what exhausts a worker.
    max_connections_per_ip: int = Field(100, ge=1, le=100_000)
    # Origin allow-list for the WebSocket: ["*"], a JSON list or a comma-separated list.
    allowed_origins: Annotated[tuple[str, ...], NoDecode] = ("*",)
    max_sessions_per_connection: int = Field(16, ge=1, le=1000)
    # Protocol limits: far above a real conversation (a 120 s utterance is about 600 characters),
    # far below what could exhaust a worker. Beyond them: INVALID_EVENT_DATA (RATE_LIMITED for recordings).
    max_text_chars: int = Field(4000, ge=100, le=1_000_000)
    max_label_chars: int = Field(200, ge=16, le=10_000)
    max_list_items: int = Field(50, ge=1, le=10_000)
    max_history_messages: int = Field(500, ge=1, le=100_000)
    max_messages_per_session: int = Field(1000, ge=1, le=1_000_000)
    max_modifications_per_session: int = Field(100, ge=1, le=100_000)
    max_recordings_per_connection: int = Field(1, ge=1, le=64)
    # Default: MAX_RECORDING_SECONDS plus RECORDING_WALL_MARGIN_SECONDS.
    recording_wall_limit_seconds: float | None = Field(None, gt=0, le=86400)
    max_ended_sessions_per_connection: int = Field(100, ge=1, le=100_000)
    runtime_dir: Path | None = None
    metrics_token: SecretStr | None = None
    # The browser console at /console (server/console/); false answers 404 there.
    console_enabled: bool = True

    # Session store: SQLite in STATE_DIR unless SESSION_STORE_URL names a Redis server. Sessions stay
    # resumable for SESSION_RESUME_WINDOW seconds after their last activity, then they are purged.
    state_dir: Path = Field(default_factory=_default_state_dir)
    session_store_url: SecretStr | None = None
    session_resume_window: float = Field(86400.0, gt=0, le=30 * 86400)
    # SQLite only: fsync every commit (survives power loss, costs milliseconds per write).
    session_store_fsync: bool = False
    # On SIGTERM: how long open recordings may take to be finished and recorded before the sockets
    # close with 1012 (inside the unit's TimeoutStopSec=30, with Sanic's own shutdown after it).
    drain_timeout: float = Field(10.0, gt=0, le=15)

    # Logging.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["json", "text"] = "json"
    log_file: Path | None = None
    log_max_size: int = Field(20 * 1024 * 1024, ge=1024)
    log_backup_count: int = Field(5, ge=0, le=100)

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("log_format", mode="before")
    @classmethod
    def _lower_format(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator(
        "openrouter_api_key",
        "metrics_token",
        "log_file",
        "runtime_dir",
        "audio_sample_rate",
        "recording_wall_limit_seconds",
        mode="before",
    )
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("vosk_sample_rate", "audio_sample_rate")
    @classmethod
    def _accepted_sample_rate(cls, value: int | None) -> int | None:
        if value is not None and value not in SAMPLE_RATES:
            raise ValueError(f"must be one of {', '.join(map(str, SAMPLE_RATES))}")
        return value

    @field_validator("log_max_size", mode="before")
    @classmethod
    def _byte_size(cls, value: object) -> object:
        """`100MB`, `512KiB`, `1g` or plain bytes; the units are binary, as the seed-era files meant."""
        if not isinstance(value, str):
            return value
        match = _SIZE.fullmatch(value.strip())
        if match is None:
            raise ValueError("must be a size such as 100MB, 512KB or 1048576")
        return int(match[1]) * 1024 ** " kmg".index(match[2].lower() or " ")

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _origin_list(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = orjson.loads(text)
                except orjson.JSONDecodeError:
                    raise ValueError("must be a JSON list of origins, or origins separated by commas") from None
            else:
                value = [item for item in (part.strip() for part in text.split(",")) if item]
        if not isinstance(value, list | tuple) or not value:
            raise ValueError("must list at least one origin (or *)")
        origins = []
        for origin in value:
            if not isinstance(origin, str) or not (origin == "*" or _ORIGIN.fullmatch(origin.rstrip("/").lower())):
                raise ValueError(f"{origin!r} is not an origin such as https://app.example.com or *")
            origins.append(origin.rstrip("/").lower())
        return tuple(origins)

    @model_validator(mode="before")
    @classmethod
    def _one_worker_count(cls, data: Any) -> Any:
        if isinstance(data, dict):
            workers, max_workers = data.get("workers"), data.get("max_workers")
            if workers is not None and max_workers is not None and str(workers).strip() != str(max_workers).strip():
                raise ValueError(f"MAX_WORKERS ({max_workers}) and WORKERS ({workers}) disagree: set only one")
        return data

    @model_validator(mode="after")
    def _pongs_outwait_transcripts(self) -> Settings:
        if self.websocket_ping_timeout <= self.stt_timeout:
            raise ValueError(
                f"WEBSOCKET_PING_TIMEOUT ({self.websocket_ping_timeout:g}) must be longer than STT_TIMEOUT "
                f"({self.stt_timeout:g}): a pong can wait behind a message_end that waits for its transcript"
            )
        return self

    @field_validator("openrouter_base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("session_store_url", mode="before")
    @classmethod
    def _redis_url(cls, value: object) -> object:
        if isinstance(value, str) and not value.strip():
            return None
        if isinstance(value, str) and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return value

    @model_validator(mode="after")
    def _default_runtime_dir(self) -> Settings:
        if self.runtime_dir is None:
            # One directory per port so that several instances (and test servers) never share sockets.
            shm = Path("/dev/shm")
            base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
            object.__setattr__(self, "runtime_dir", base / f"{SERVICE_NAME}-{self.port}")
        if self.max_workers is not None:
            object.__setattr__(self, "workers", self.max_workers)
        return self

    @property
    def recording_wall_limit(self) -> float:
        """How long a recording may stay open, whatever the client sends (a trickle holds no slot for ever)."""
        return self.recording_wall_limit_seconds or self.max_recording_seconds + RECORDING_WALL_MARGIN_SECONDS

    @property
    def client_sample_rate(self) -> int:
        return self.audio_sample_rate or self.vosk_sample_rate

    @property
    def llm_mode(self) -> str:
        return "openrouter" if self.openrouter_api_key else "mock"

    @property
    def stt_mode(self) -> str:
        return "vosk" if self.use_real_vosk and self.vosk_model_path.is_dir() else "mock"

    @property
    def pool_dir(self) -> Path:
        assert self.runtime_dir is not None
        return self.runtime_dir


def _describe(error: ValidationError) -> str:
    first = error.errors()[0]
    if not first["loc"]:  # a check across settings: its message names them
        return f"invalid setting {first['msg'].removeprefix('Value error, ')}"
    name = str(first["loc"][0]).upper() if first["loc"] else "CONFIGURATION"
    value = first.get("input")
    shown = "" if name in {"OPENROUTER_API_KEY", "METRICS_TOKEN", "SESSION_STORE_URL"} else f" (got {value!r})"
    return f"invalid setting {name}{shown}: {first['msg'].removeprefix('Value error, ')}"


def load_settings(env_file: str | Path | None = None) -> Settings:
    """Build the settings once; raise ConfigError naming the first invalid variable.

    The `.env` file is `ENV_FILE` if set (tests point it at their own file), else `.env` in the
    project root.
    """
    if env_file is None:
        env_file = os.environ.get("ENV_FILE") or PROJECT_ROOT / ".env"
    try:
        return Settings(_env_file=env_file)
    except ValidationError as error:
        raise ConfigError(_describe(error)) from None
