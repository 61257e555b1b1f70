"""A request's body on its way upstream, across its tries.

The body is kept as it came (each carrier frames it for its protocol: ``upstream``,
``h2upstream``), with its trailers and whether it is whole. What no connection has taken yet
waits in ``pending``; past ``PENDING_LIMIT`` the client is paused. A copy of the body is kept
for another try (``replay``) while it is at most ``REPLAY_LIMIT`` and the request may be sent
twice at all; a longer one is not replayed.
"""

from __future__ import annotations

from sidecar.http.http1 import Headers

#: request body bytes kept for a replay on a fresh connection; larger bodies are not replayed
REPLAY_LIMIT = 64 * 1024
#: body bytes held while connecting before the client is paused
PENDING_LIMIT = 64 * 1024


class Outbox:
    """One request's body upstream: held, and kept for another try. (Its lists are made when
    a body comes: most requests have none, and go as their head alone.)"""

    __slots__ = (
        "_pending",
        "_pending_size",
        "_replay",
        "_replay_size",
        "ended",
        "held_back",
        "replayable",
        "trailers",
    )

    def __init__(self, replayable: bool) -> None:
        self._pending: list[bytes] | None = None  # body bytes not yet written upstream
        self._pending_size = 0
        self._replay: list[bytes] | None = None  # the body so far, kept for another try
        self._replay_size = 0
        #: the whole body so far is kept (or none came): another try can send it again
        self.replayable = replayable
        #: the body is whole (the client's request is complete)
        self.ended = False
        #: the body's trailers (None: none came, as for most requests)
        self.trailers: Headers | None = None
        #: ``hold`` went over ``PENDING_LIMIT`` (the client was paused) since the last ``take``
        self.held_back = False

    def __repr__(self) -> str:
        kept = f"{self._replay_size} bytes kept" if self.replayable else "not kept"
        ended = ", ended" if self.ended else ""
        return f"<Outbox [{self._pending_size} bytes pending, {kept}{ended}]>"

    # -- the body -------------------------------------------------------------------------

    def trailer(self, name: bytes, value: bytes) -> None:
        if self.trailers is None:
            self.trailers = []
        self.trailers.append((name, value))

    def keep(self, data: bytes) -> None:
        """Body bytes: kept for another try, while they fit."""
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

    def again(self) -> None:
        """Another try: the body again, from the replay."""
        assert self.replayable
        self._pending = None if self._replay is None else list(self._replay)
        self._pending_size = self._replay_size

    def take(self) -> list[bytes] | None:
        """Everything pending (None: nothing), for a connection that takes it now."""
        pending, self._pending = self._pending, None
        self._pending_size = 0
        self.held_back = False
        return pending

    def clear(self) -> None:
        self._pending = None
        self._pending_size = 0
