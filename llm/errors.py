"""LLM failures by meaning. Each maps to exactly one protocol error code (see server/generation.py).

Messages never contain the API key: the client scrubs every provider text it quotes.
"""

from __future__ import annotations


class LlmError(Exception):
    """The provider failed or answered with nothing usable (LLM_SERVICE_ERROR)."""


class LlmTimeout(LlmError):
    """No usable answer within LLM_TIMEOUT, retries included (SERVICE_TIMEOUT)."""


class LlmConnectionError(LlmError):
    """The provider could not be reached or dropped the connection (retried while the budget lasts)."""


class LlmStatusError(LlmError):
    """The provider answered with an HTTP error status; `status` says which."""

    def __init__(self, message: str, status: int, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status = status
        # Seconds the provider asked us to wait (Retry-After), if it said.
        self.retry_after = retry_after


class LlmAuthError(LlmStatusError):
    """The provider refused the key or the account (401/402/403); retrying cannot help."""


class LlmRateLimited(LlmStatusError):
    """The provider kept answering 429 until the retries or the time budget ran out."""


class LlmBadResponse(LlmError):
    """The answer could not be turned into the requested suggestions."""
