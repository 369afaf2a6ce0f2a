"""Running the app under uvicorn the way a shared deployment needs it.

- The listening socket is bound before the model loads, so a busy port fails at once.
- SIGTERM / SIGINT drain: stop accepting, let in-flight requests finish within the grace
  period, end the rest with a terminal error event, then exit 0.
- A connection that has not sent a whole request head within `header_timeout` is closed
  (slow-loris); body and keep-alive timeouts are the app's and uvicorn's.
- If the engine dies the server stops and the process exits 1, so a supervisor restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("shoal")
EXIT_ENGINE_DEAD = 1


class HeaderTimeoutH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head trickles in."""

    header_timeout = 10.0  # set per server by `serve`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            if self._header_timer is not None:
                self._header_timer.cancel()  # the request head is complete
                self._header_timer = None
        elif self._header_timer is None:
            # The first bytes of the next request on a kept-alive connection: its own deadline
            # (an idle kept-alive connection is uvicorn's --keep-alive-timeout's business).
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._on_header_timeout)

    def _on_header_timeout(self) -> None:
        self._header_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closing a connection from %s: no complete request head within %.0f s",
                     self.client and self.client[0], self.header_timeout)
            self.transport.close()


class ShoalServer(uvicorn.Server):
    """uvicorn's server with a drain before its own shutdown and an engine watchdog."""

    def __init__(self, config: uvicorn.Config, drain_timeout: float):
        super().__init__(config)
        self.drain_timeout = drain_timeout
        self.exit_code = 0

    def _engine(self):
        state = getattr(self.config.app.state, "server", None)
        return state.engine if state is not None else None

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal once it has shut down, so the process dies of it;
            # a drained server exits 0 (or 1 if the engine died) instead.
            self._captured_signals.clear()

    async def on_tick(self, counter: int) -> bool:
        engine = self._engine()
        if engine is not None and engine.dead_error is not None and not self.should_exit:
            log.error("the engine has died (%s); stopping the server (exit %d)",
                      engine.dead_error, EXIT_ENGINE_DEAD)
            self.exit_code = EXIT_ENGINE_DEAD
            return True
        return await super().on_tick(counter)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:  # stop accepting first; uvicorn repeats this, harmlessly
            server.close()
        for sock in sockets or []:
            sock.close()
        # Idle keep-alive connections close now and busy ones after their response, so no new
        # request reaches a draining replica (a gateway sends it to another one).
        for connection in list(self.server_state.connections):
            connection.shutdown()
        engine = self._engine()
        if engine is not None and engine.is_alive and not self.force_exit:
            await engine.drain(self.drain_timeout)
        await super().shutdown(sockets)


def bind_socket(host: str, port: int) -> socket.socket:
    """The listening socket, bound now (OSError: the port is taken or the host is wrong)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


def serve(app, sock: socket.socket, *, log_level: str, drain_timeout: float, header_timeout: float,
          keep_alive_timeout: float) -> int:
    """Serve `app` on the bound `sock` until a signal or the engine's death; the exit code."""
    protocol = type("Protocol", (HeaderTimeoutH11Protocol,), {"header_timeout": header_timeout})
    config = uvicorn.Config(app, log_level=log_level, http=protocol, timeout_keep_alive=keep_alive_timeout,
                            timeout_graceful_shutdown=5)
    server = ShoalServer(config, drain_timeout)
    server.run(sockets=[sock])
    return server.exit_code
