"""Who may open a WebSocket: the Origin allow-list and the per-address connection limit."""

from __future__ import annotations

import ipaddress
from collections import Counter

from sanic import Request


def client_address(request: Request) -> str:
    """The client's IP; behind a local reverse proxy (the shipped nginx site) the one it reports.

    Only a proxy on this machine is believed: anyone else could put any address in the header.
    """
    peer = request.ip
    forwarded = request.headers.get("x-real-ip", "").strip()
    if forwarded and _is_loopback(peer) and _is_ip(forwarded):
        return forwarded
    return peer


def origin_allowed(origin: str | None, allowed: tuple[str, ...]) -> bool:
    """No Origin header (the phone app, scripts) is always allowed; browsers send one."""
    if origin is None or "*" in allowed:
        return True
    return origin.strip().rstrip("/").lower() in allowed


class ConnectionCounter:
    """Open WebSockets per client address in this worker process."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: Counter[str] = Counter()

    def enter(self, address: str) -> bool:
        if self.open[address] >= self.limit:
            return False
        self.open[address] += 1
        return True

    def leave(self, address: str) -> None:
        self.open[address] -= 1
        if self.open[address] <= 0:
            del self.open[address]


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_loopback(text: str) -> bool:
    return _is_ip(text) and ipaddress.ip_address(text).is_loopback
