"""`X-Request-Id`: taken from the client (when sane) or made up, stored in the request's
scope state, echoed on every response, and used as the prefix of the engine's request ids."""

from __future__ import annotations

import re
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
# Echoed into logs and headers: keep it short and free of control characters.
ACCEPTED = re.compile(r"[A-Za-z0-9._:/+=-]{1,128}")


def client_request_id(scope: Scope) -> str | None:
    for name, value in scope.get("headers", ()):
        if name == HEADER:
            text = value.decode("latin-1")
            return text if ACCEPTED.fullmatch(text) else None
    return None


class RequestIdMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming and disconnects pass through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = client_request_id(scope) or secrets.token_hex(8)
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, request_id.encode())]}
            await send(message)

        await self.app(scope, receive, send_with_id)


def new_request_id(base: str) -> str:
    """A unique id for one API request: the client's id stays readable as the prefix."""
    return f"{base}-{secrets.token_hex(4)}"
