"""`GET /console`: the browser console (static files in server/console/), unless CONSOLE_ENABLED is false.

The page uses only relative URLs (`console/...` for its assets, `conversation` for the WebSocket),
so it works wherever the service is mounted, directly or behind the nginx site, over http or https.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sanic import Request, Sanic
from sanic.response import HTTPResponse, file, redirect
from sanic_ext import openapi

from config import Settings

CONSOLE_DIR = Path(__file__).resolve().parent / "console"
# Only the console's own files run on the page; the WebSocket and the health check are same-origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HEADERS = {"Content-Security-Policy": CONTENT_SECURITY_POLICY, "Cache-Control": "no-cache"}


def register_console_routes(app: Sanic[Any, Any]) -> None:
    settings: Settings = app.ctx.settings
    if not settings.console_enabled:
        return

    @app.get("/console", strict_slashes=True)
    @openapi.exclude()
    async def console_page(request: Request) -> HTTPResponse:
        return await file(CONSOLE_DIR / "index.html", headers=HEADERS)

    @app.get("/console/", strict_slashes=True)
    @openapi.exclude()
    async def console_slash(request: Request) -> HTTPResponse:
        # The page's relative URLs resolve against `/console`, not `/console/`.
        return redirect("../console", status=301)

    app.static("/console/", CONSOLE_DIR, name="console_assets", strict_slashes=True)
