"""Mesh TLS under a connection's HTTP protocol: ``TlsLayer``.

One TLS session over memory BIOs (``ssl.SSLObject``), between the socket's transport and the
HTTP protocol (a ``Downstream`` or an ``UpstreamConnection``), which sees the layer as its
transport and never knows. Our own rather than asyncio's ``start_tls`` for two reasons: the
inbound listener decides between TLS and plaintext on a connection's first bytes, which it has
already read (``start_tls`` cannot be handed them), and the peer's identity is checked before
the HTTP protocol hears of the connection.

Flow control passes through: the socket's pause and resume of writing go to the protocol above,
the protocol's pause and resume of reading go to the socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, Final, Protocol

from sidecar.tls import peer_identity

#: the most plaintext one ``read`` takes out of the session: a TLS record's (one read returns
#: one record's at most, and a larger buffer is only a larger allocation)
_READ: Final = 16 * 1024


class _Core(Protocol):
    """What the data path calls of a TLS session: ``ssl.SSLObject``'s, or the C object under
    it (``_ssl._SSLSocket``), which has the same methods without a Python frame around each."""

    def read(self, len: int, /) -> bytes: ...

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...


#: what the layer says once the handshake is done: the peer's SPIFFE ID (None: it has none).
#: Returning a reason refuses the peer (the connection is aborted); None lets it in.
Verdict = Callable[["TlsLayer", str | None], str | None]


class TlsLayer(asyncio.Transport, asyncio.Protocol):
    """A TLS session between a socket (this is its protocol) and an HTTP protocol (this is
    its transport)."""

    def __init__(
        self,
        context: ssl.SSLContext,
        protocol: asyncio.Protocol,
        *,
        server_side: bool,
        attached: bool = False,
        verdict: Verdict,
        failed: Callable[[str], None],
        session: ssl.SSLSession | None = None,
    ) -> None:
        super().__init__()
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side, session=session)
        # the data path calls the session's C object straight, and through bound methods:
        # ``SSLObject.read``/``write`` are Python functions around it (one frame each, four a
        # request over two hops), and a bound method spares a lookup per call
        core: _Core = getattr(self.tls, "_sslobj", self.tls)  # (CPython's; else the wrapper)
        self._decrypt = core.read
        self._encrypt = core.write
        self._feed = self._in.write
        self._drain = self._out.read
        self._protocol = protocol
        self._verdict = verdict
        self._failed: Callable[[str], None] | None = failed
        self._raw: asyncio.Transport | None = None
        self._open = False  # the handshake is done
        # the protocol knows of the connection: from the start (``attached``: the inbound
        # listener's, which read the first bytes itself), else once the handshake is done
        self._told = attached
        self._closing = False
        self._error: Exception | None = None  # why the session failed, for connection_lost
        #: the verified peer's SPIFFE ID, once the handshake is done
        self.peer: str | None = None

    def __repr__(self) -> str:
        state = "open" if self._open else "closing" if self._closing else "handshaking"
        return f"<TlsLayer {state} peer={self.peer!r}>"

    # -- the socket's side (asyncio.Protocol) ---------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]  # (a stream transport)
        if not self.tls.server_side:
            self._handshake()  # the client speaks first

    def data_received(self, data: bytes) -> None:
        self._feed(data)
        if not self._open and not self._handshake():
            return
        # What the reads leave to send is not looked at (a call each time): in TLS 1.3 a read
        # writes only the answer to a peer's KeyUpdate, which RFC 8446 4.6.3 wants before our
        # next record, and ``write`` sends it then; session tickets go with the handshake.
        decrypt, protocol = self._decrypt, self._protocol
        while True:
            try:
                plain = decrypt(_READ)
            except ssl.SSLWantReadError:
                return
            except ssl.SSLZeroReturnError:
                plain = b""
            except ssl.SSLError as e:
                self._fail(f"TLS: {e.reason or e}")
                return
            if not plain:  # the peer's close_notify: its end of the stream, and ours
                self.close()
                return
            protocol.data_received(plain)
            if not self._in.pending or self._raw is None:
                return

    def eof_received(self) -> bool | None:
        return None  # (a TLS stream ends with close_notify; a bare FIN closes it)

    def connection_lost(self, exc: Exception | None) -> None:
        self._raw = None
        self._closing = True
        if not self._open and self._failed is not None:
            self._fail("the connection closed during the TLS handshake")
        if self._told:
            self._told = False
            self._protocol.connection_lost(exc or self._error)

    def pause_writing(self) -> None:
        if self._told:
            self._protocol.pause_writing()

    def resume_writing(self) -> None:
        if self._told:
            self._protocol.resume_writing()

    # -- the handshake --------------------------------------------------------------------

    def _handshake(self) -> bool:
        """Go on with the handshake: True once it is done and the peer accepted."""
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return False
        except (ssl.SSLError, ssl.CertificateError) as e:
            self._flush()  # (the alert, so that the peer learns why)
            self._fail(f"TLS handshake: {getattr(e, 'reason', None) or e}")
            return False
        self._flush()
        self.peer = peer_identity(self.tls)
        refused = self._verdict(self, self.peer)
        if refused is not None:
            self._fail(refused)
            return False
        self._open = True
        self._failed = None
        if not self._told:
            self._told = True
            self._protocol.connection_made(self)
        return True

    def _fail(self, why: str) -> None:
        failed, self._failed = self._failed, None
        raw, self._raw = self._raw, None
        self._closing = True
        self._error = ConnectionResetError(why)
        if failed is not None:
            failed(why)
        if raw is not None:
            raw.abort()  # (its connection_lost tells the protocol, if it knows of it)

    def _flush(self) -> None:
        out = self._out
        if out.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(out.read())

    # -- the HTTP protocol's side (asyncio.Transport) -------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._raw is None or self._closing:
            return
        try:
            self._encrypt(data)  # (whole: Python's ssl does not ask OpenSSL for partial writes)
        except ssl.SSLError as e:
            self._fail(f"TLS: {e.reason or e}")
            return
        self._raw.write(self._drain())

    def is_closing(self) -> bool:
        return self._closing or self._raw is None or self._raw.is_closing()

    def close(self) -> None:
        """Close after what was written: a close_notify, then the socket."""
        if self._closing:
            return
        self._closing = True
        with contextlib.suppress(ssl.SSLError):  # (the peer's close_notify is not awaited)
            self.tls.unwrap()
        self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def can_write_eof(self) -> bool:
        return False  # TLS has no half-close: the client's end is its close_notify

    def pause_reading(self) -> None:
        if self._raw is not None:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if self._raw is not None:
            self._raw.resume_reading()

    def is_reading(self) -> bool:
        return self._raw is not None and self._raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return 0 if self._raw is None else self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return (0, 0) if self._raw is None else self._raw.get_write_buffer_limits()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]  # (stream protocols only)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.tls
        if name == "peer_identity":
            return self.peer
        return default if self._raw is None else self._raw.get_extra_info(name, default)
