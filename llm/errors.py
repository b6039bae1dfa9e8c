"""LLM failures by meaning. Each maps to exactly one protocol error code (see server/generation.py)."""


class LlmError(Exception):
    """The provider failed or answered with nothing usable (LLM_SERVICE_ERROR)."""


class LlmTimeout(LlmError):
    """No usable answer within LLM_TIMEOUT, retries included (SERVICE_TIMEOUT)."""


class LlmAuthError(LlmError):
    """The provider refused the key or the account (401/402/403); retrying cannot help."""


class LlmRateLimited(LlmError):
    """The provider kept answering 429 until the time budget ran out."""


class LlmBadResponse(LlmError):
    """The answer could not be turned into the requested suggestions."""
