"""uvicorn's h11 protocol with the limits only the connection can enforce well: the
size of a request's head, the time it may take to arrive, and a declared body size.

Without them a client could send a 16 MB header, keep a connection open forever by
sending one header byte every few seconds (slowloris), or make the server take in a
50 MB body before anything looks at it. A body without a declared length, and the
body's pace, are bounded by the ASGI guard (runtime.http_guard), which reads it.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .settings import HttpLimits

# How long a refused connection's input is still read (and dropped) before closing.
_LINGER_SECONDS = 2.0
_REASONS = {
    408: "Request Timeout",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
}


class GuardedH11Protocol(H11Protocol):
    # Set by the server before it starts (runtime.server.serve).
    limits = HttpLimits()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn = h11.Connection(h11.SERVER, self.limits.max_header_bytes)
        self._head_timer: asyncio.TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:  # answered already: drain until the connection closes
            return
        if self.conn.their_state is h11.IDLE:
            buffered = self.conn.trailing_data[0] + data
            end = buffered.find(b"\r\n\r\n")
            if (end if end >= 0 else len(buffered)) > self.limits.max_header_bytes:
                self._refuse(431, "the request's headers exceed the server's limit.")
                return
            self._arm_head_timer()
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm_head_timer()
                self._check_declared_length()
            return
        super().data_received(data)

    # ------------------------------------------------------------- internal

    def _check_declared_length(self) -> None:
        length = next((v for k, v in self.headers or () if k == b"content-length"), b"")
        limit = self.limits.max_body_bytes
        if length.isdigit() and int(length) > limit:
            if self.cycle is not None:  # the request never reaches the application
                self.cycle.disconnected = True
            self._refuse(
                413,
                f"the request body is {int(length)} bytes; the server takes at most {limit} "
                "(runtime.http.limits.max_body_bytes).",
            )

    def _arm_head_timer(self) -> None:
        # A keep-alive connection's next request gets its deadline from its first byte;
        # until then uvicorn's keep-alive timeout applies.
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_seconds, self._head_timed_out
            )

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self._refuse(408, "the request's headers took too long to arrive.")

    def _refuse(self, status: int, message: str) -> None:
        """Answer and close. Closing with unread input makes the kernel send a reset,
        which can destroy the answer before the client reads it; so what still arrives
        is read and dropped for a moment first (a lingering close)."""
        self._disarm_head_timer()
        self._refused = True
        self.flow.resume_reading()  # uvicorn may have paused it with a body half read
        body = message.encode()
        head = (
            f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
            f"content-type: text/plain; charset=utf-8\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.loop.call_later(_LINGER_SECONDS, self.transport.close)
