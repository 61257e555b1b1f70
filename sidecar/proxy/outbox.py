"""A request's bytes on their way upstream, across its tries.

The body is framed for HTTP/1 as it comes (a chunked body is chunked again, its trailers end
it). What no connection has taken yet waits in ``pending``, behind the head made for the
current try; past ``PENDING_LIMIT`` the client is paused. A copy of the body is kept for
another try (``replay``) while it is at most ``REPLAY_LIMIT`` and the request may be sent
twice at all; a longer one is not replayed.
"""

from __future__ import annotations

from sidecar.http import http1
from sidecar.http.http1 import Headers

#: request body bytes kept for a replay on a fresh connection; larger bodies are not replayed
REPLAY_LIMIT = 64 * 1024
#: body bytes held while connecting before the client is paused
PENDING_LIMIT = 64 * 1024


class Outbox:
    """One request's upstream bytes: framed, held, and kept for another try. (Its lists are
    made when a body comes: most requests have none, and go as their head alone.)"""

    __slots__ = (
        "_chunked",
        "_head",
        "_pending",
        "_pending_size",
        "_replay",
        "_replay_size",
        "_trailers",
        "held_back",
        "replayable",
    )

    def __init__(self, chunked: bool, replayable: bool) -> None:
        self._chunked = chunked
        self._head = b""  # the current try's head, not yet written upstream
        self._pending: list[bytes] | None = None  # framed body bytes not yet written upstream
        self._pending_size = 0  # (the head's bytes included)
        self._replay: list[bytes] | None = None  # the body so far, kept for another try
        self._replay_size = 0
        #: the whole body so far is kept (or none came): another try can send it again
        self.replayable = replayable
        self._trailers: Headers | None = None  # (most requests have none)
        #: ``hold`` went over ``PENDING_LIMIT`` (the client was paused) since the last ``take``
        self.held_back = False

    def __repr__(self) -> str:
        kept = f"{self._replay_size} bytes kept" if self.replayable else "not kept"
        return f"<Outbox [{self._pending_size} bytes pending, {kept}]>"

    # -- the body, framed -----------------------------------------------------------------

    def frame(self, data: bytes) -> bytes:
        """A piece of the request body as it goes upstream."""
        return http1.chunk(data) if self._chunked else data

    def trailer(self, name: bytes, value: bytes) -> None:
        if self._trailers is None:
            self._trailers = []
        self._trailers.append((name, value))

    def last(self) -> bytes:
        """The end of a chunked body: its last chunk with the trailers (b"": not chunked)."""
        if not self._chunked:
            return b""
        trailers, self._trailers = self._trailers, None
        return http1.last_chunk(trailers or [])

    def keep(self, data: bytes) -> None:
        """Framed body bytes: kept for another try, while they fit."""
        if not self.replayable:
            return
        if self._replay is None:
            self._replay = []
        self._replay.append(data)
        self._replay_size += len(data)
        if self._replay_size > REPLAY_LIMIT:
            self._replay = None
            self.replayable = False

    def forget(self) -> None:
        """No other try will send the body: keep none of it."""
        self.replayable = False
        self._replay = None
        self._replay_size = 0

    # -- what waits for a connection ------------------------------------------------------

    def hold(self, data: bytes) -> bool:
        """Bytes no connection takes yet; True when they are over ``PENDING_LIMIT``."""
        if self._pending is None:
            self._pending = []
        self._pending.append(data)
        self._pending_size += len(data)
        over = self._pending_size > PENDING_LIMIT
        if over:
            self.held_back = True
        return over

    def first(self, head: bytes) -> None:
        """The first try's head, ahead of the body that came with the request."""
        self._head = head
        self._pending_size += len(head)

    def again(self, head: bytes) -> None:
        """Another try: its head, then the body again from the replay."""
        assert self.replayable
        self._head = head
        self._pending = None if self._replay is None else list(self._replay)
        self._pending_size = len(head) + self._replay_size

    def readdressed(self, head: bytes) -> None:
        """The same try to another endpoint (none of it went out): a new head, same body."""
        self._pending_size += len(head) - len(self._head)
        self._head = head

    def take(self) -> bytes:
        """Everything pending, for a connection that takes it now."""
        pending, head = self._pending, self._head
        self._head = b""
        self._pending_size = 0
        self.held_back = False
        if pending is None:
            return head
        self._pending = None
        pending.insert(0, head)
        return b"".join(pending)

    def clear(self) -> None:
        self._head = b""
        self._pending = None
        self._pending_size = 0
