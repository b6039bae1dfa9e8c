"""Structured logging: one JSON line (or one text line) per event that matters.

Extra fields passed with `extra={...}` (session_id, request_id, ...) become JSON keys. Every
configured secret is redacted from every line, whatever logged it, so a key pasted into an
exception message by a library still never reaches journald or the log file.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import orjson

from config import Settings
from llm.redaction import REDACTED

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            "pid": record.process,
        }
        line.update({key: value for key, value in record.__dict__.items() if key not in _STANDARD})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


# C0 and C1 control characters and the Unicode line separators, as Python escapes them.
_CONTROL = {code: chr(code).encode("unicode_escape").decode() for code in [*range(0x20), *range(0x7F, 0xA0)]}
_CONTROL |= {0x2028: "\\u2028", 0x2029: "\\u2029"}


def escape_controls(text: str) -> str:
    """One log record stays one line: a client's newline (or terminal escape) is shown, not obeyed."""
    return text.translate(_CONTROL)


class TextFormatter(logging.Formatter):
    """One line per record; control characters in the message and fields are escaped.

    A traceback follows on indented lines, so no continuation line can pass for a record.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        record.message = escape_controls(record.getMessage())
        record.asctime = self.formatTime(record, self.datefmt)
        text = self.formatMessage(record)
        extras = " ".join(f"{k}={escape_controls(str(v))}" for k, v in record.__dict__.items() if k not in _STANDARD)
        if extras:
            text = f"{text} {extras}"
        trace = record.exc_text or (self.formatException(record.exc_info) if record.exc_info else "")
        if trace:
            text += "".join(f"\n    {escape_controls(line)}" for line in trace.splitlines())
        return text


class RedactSecrets(logging.Filter):
    """Replace every configured secret in the formatted line (applied at the handler)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = [secret for secret in secrets if len(secret) >= 4]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        extras = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        for secret in self.secrets:
            message = message.replace(secret, REDACTED)
            extras = {k: str(v).replace(secret, REDACTED) if secret in str(v) else v for k, v in extras.items()}
        record.msg, record.args = message, ()
        record.__dict__.update(extras)
        if record.exc_info:
            text = logging.Formatter().formatException(record.exc_info)
            for secret in self.secrets:
                text = text.replace(secret, REDACTED)
            record.exc_info, record.exc_text = None, text
        return True


def secrets_of(settings: Settings) -> list[str]:
    values = [settings.openrouter_api_key, settings.metrics_token]
    return [value.get_secret_value() for value in values if value is not None]


def configure_logging(settings: Settings) -> None:
    """Route every logger (ours and Sanic's) through one handler per destination."""
    formatter: logging.Formatter = JsonFormatter() if settings.log_format == "json" else TextFormatter()
    redact = RedactSecrets(secrets_of(settings))
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if settings.log_file is not None:
        settings.log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(
            logging.handlers.RotatingFileHandler(
                settings.log_file,
                maxBytes=settings.log_max_size,
                backupCount=settings.log_backup_count,
                encoding="utf-8",
            )
        )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(redact)
        root.addHandler(handler)
    root.setLevel(settings.log_level)
    for name in ("sanic.root", "sanic.error", "sanic.server", "sanic.websockets"):
        logger = logging.getLogger(name)
        logger.handlers.clear()
        logger.propagate = True
    logging.getLogger("sanic.access").setLevel(logging.WARNING)
