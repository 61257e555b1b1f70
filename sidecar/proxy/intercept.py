"""Connections that ``meshlet iptables`` redirected to a listener: where they were going, and
whether they speak HTTP.

The nat rules keep a redirected connection's original destination, which its socket answers
for ``SO_ORIGINAL_DST``; a connection made to the listener itself (an app using the sidecar as
its ``http_proxy``) has none. What a redirected connection carries is decided by its port
(``Interception.opaque_ports``: protocols where the server speaks first, Linkerd's
defaults) and else by its first bytes: an HTTP/1 request line is proxied as HTTP; anything
else (TLS, a database protocol), or nothing before the head timeout, is relayed unparsed
(``relay``).
"""

from __future__ import annotations

import asyncio
import socket
from dataclasses import dataclass
from typing import Final

from sidecar.config import OPAQUE_PORTS

#: ``linux/netfilter_ipv4.h``: the destination a connection had before nat redirected it
SO_ORIGINAL_DST: Final = 80
#: an HTTP/1 method is a token; these (and a space) open nearly every request line
_METHOD_CHARS: Final = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ-_")
_LONGEST_METHOD: Final = 20


@dataclass(frozen=True)
class Interception:
    """What a listener does with redirected connections."""

    opaque_ports: frozenset[int] = frozenset(OPAQUE_PORTS)
    """original destination ports relayed unparsed at once (``config.OPAQUE_PORTS``)"""
    local: bool = False
    """inbound: opaque streams go to the original port on 127.0.0.1 (the app's); outbound:
    to the original destination"""
    http_port: int = 0
    """inbound: the app's port, the only one proxied as HTTP (0: any)"""
    connect_timeout: float = 5.0
    idle_timeout: float = 3600.0
    """seconds an opaque stream may go without a byte either way"""

    def destination(self, original: tuple[str, int]) -> tuple[str, int]:
        """Where an opaque stream that was going to ``original`` goes."""
        return ("127.0.0.1", original[1]) if self.local else original

    def opaque(self, original: tuple[str, int]) -> bool:
        """Relayed unparsed whatever it sends: by its port."""
        port = original[1]
        return port in self.opaque_ports or (self.http_port != 0 and port != self.http_port)


def original_destination(transport: asyncio.BaseTransport) -> tuple[str, int] | None:
    """Where a redirected connection was going (IPv4); None when it came to the listener
    itself, or nat is not in use."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:  # ENOENT: no nat entry; ENOPROTOOPT: not IPv4, or no netfilter
        return None
    original = (socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big"))
    here = sock.getsockname()
    return None if original == (here[0], here[1]) else original


def looks_like_http(data: bytes) -> bool | None:
    """Whether the first bytes of a connection open an HTTP/1 request line (a method token
    and a space); None: too few bytes to tell."""
    for i, byte in enumerate(data[: _LONGEST_METHOD + 1]):
        if byte == 0x20:
            return i > 0
        if byte not in _METHOD_CHARS:
            return False
    return None if len(data) <= _LONGEST_METHOD else False
