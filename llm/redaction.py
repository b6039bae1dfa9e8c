"""The one placeholder that stands in for a secret wherever text might carry one (log lines, error messages).

It lives in the `llm` package because `llm` imports nothing of the project: the client puts it in
place of its key in provider messages, and the service's log filter (`config.logs`) imports it
from here, so the library never reaches into the service's settings.
"""

from __future__ import annotations

REDACTED = "[REDACTED]"
