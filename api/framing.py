"""Request framing a shared server must enforce before any route runs (pure ASGI):

- a request with both Content-Length and Transfer-Encoding is ambiguous (request smuggling):
  400, and the connection is closed;
- the body must arrive within `body_timeout` seconds of the request head: 408 (in the
  API's error shape, raised from the route's read) and the connection is closed.
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from shoal.api.errors import APIError, error_response

CLOSE = {"connection": "close"}


class BodyTimeoutError(APIError):
    def __init__(self, timeout: float):
        super().__init__(408, f"The request body did not arrive within {timeout:g} s.", headers=CLOSE)


class FramingMiddleware:
    def __init__(self, app: ASGIApp, body_timeout: float):
        self.app = app
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name.lower() for name, _ in scope.get("headers", ())}
        if b"content-length" in names and b"transfer-encoding" in names:
            response = error_response(400, "The request has both Content-Length and Transfer-Encoding.",
                                      headers=CLOSE)
            await response(scope, receive, send)
            return
        await self.app(scope, self._timed(receive), send)

    def _timed(self, receive: Receive) -> Receive:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        body_done = False

        async def timed_receive() -> Message:
            nonlocal body_done
            if body_done:  # later receives wait for the disconnect: no deadline on those
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.0))
            except asyncio.TimeoutError:  # the builtin TimeoutError only from 3.11
                raise BodyTimeoutError(self.body_timeout) from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        return timed_receive
