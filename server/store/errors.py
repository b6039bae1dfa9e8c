"""The store's exceptions, caught by meaning: each maps to one protocol answer.

- `SessionNotFound` -> `SESSION_NOT_FOUND`
- `SessionExpired` -> `SESSION_EXPIRED` (`reason` says whether the window ran out or the session was ended)
- `SessionTakenOver` -> the caller no longer holds the session; it sends nothing more for it
- `StoreUnavailable` -> `INTERNAL_ERROR`: the backend cannot be reached or written (Redis down, disk full)

Messages never carry the store URL's password or any session content.
"""

from __future__ import annotations

from typing import Literal

ExpiryReason = Literal["expired", "ended"]


class StoreError(Exception):
    """Base of every store exception."""


class StoreUnavailable(StoreError):
    """The backend could not be reached or could not commit: the change is not confirmed, nothing may be sent.

    SQLite rolls a failed transaction back. A Redis call that timed out may still have been applied
    by the server; every operation is safe to retry except `append_message`, which would append twice.
    """


class SessionNotFound(StoreError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {session_id} not found")
        self.session_id = session_id


class SessionExpired(StoreError):
    def __init__(self, session_id: str, reason: ExpiryReason) -> None:
        super().__init__(f"session {session_id} {reason}")
        self.session_id = session_id
        self.reason: ExpiryReason = reason


class SessionTakenOver(StoreError):
    def __init__(self, session_id: str, epoch: int) -> None:
        super().__init__(f"session {session_id}: attachment {epoch} no longer holds it")
        self.session_id = session_id
        self.epoch = epoch
