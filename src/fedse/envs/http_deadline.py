"""A request deadline for `fedse serve-env`'s HTTP server.

uvicorn closes a connection that sits idle between requests, but not one that sends a request a
byte at a time (slowloris) or declares a body and never finishes it: each such connection holds
one of the server's places until the client gives up, and a few hundred of them shut out every
other client. `RequestDeadline` is uvicorn's HTTP/1.1 protocol with one addition: a request must
arrive whole, headers and body, within `seconds` of its connection opening or of the previous
reply; a connection still receiving one when the time is up is closed. The time the environment
takes to answer is not counted.
"""

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol


class RequestDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request has not arrived whole in time."""

    seconds: float = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.deadline: asyncio.TimerHandle | None = None
        self.start_deadline()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.start_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        super().connection_lost(exc)

    def start_deadline(self) -> None:
        """The next request has `seconds` from now to arrive."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.deadline = self.loop.call_later(self.seconds, self.deadline_passed)

    def deadline_passed(self) -> None:
        # IDLE: not one whole header block yet; SEND_BODY: headers in, body unfinished. DONE means
        # the request arrived and the app is answering it, which takes as long as it takes.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


def with_deadline(seconds: float) -> type[RequestDeadline]:
    """The protocol class with a deadline of `seconds` (uvicorn takes a class, not an instance)."""
    return type("RequestDeadline", (RequestDeadline,), {"seconds": seconds})
