"""Where an HTTP/1 message's body ends: decided here, in one place (h11's ``_body_framing``).

A proxy that decides framing in several places has several places to get a smuggling rule
wrong. Every decision about where a body ends, for a request, a response, or the response as
the proxy relays it to its client, is one of the three functions below; the parser's flags
(``RequestHead``, ``ResponseHead``) are their input, never tested elsewhere.

llhttp has already refused what no proxy should pass on (a ``Content-Length`` beside a
``Transfer-Encoding``, a request whose last coding is not ``chunked``), so these answer only
for messages that parsed.
"""

from __future__ import annotations

import enum
from typing import Final


class Framing(enum.Enum):
    """How a message's body is delimited on the wire."""

    EMPTY = 0
    """no body, whatever the headers say"""
    LENGTH = 1
    """``Content-Length`` bytes"""
    CHUNKED = 2
    """chunks, ended by the last chunk and its trailers"""
    UNTIL_CLOSE = 3
    """everything up to the connection's close (responses only)"""


# The members as module constants for the hot path: on Python 3.11 each ``Framing.X`` goes
# through EnumType.__getattr__ (~0.1 us in pure Python; compiled, both are static loads)
EMPTY: Final = Framing.EMPTY
LENGTH: Final = Framing.LENGTH
CHUNKED: Final = Framing.CHUNKED
UNTIL_CLOSE: Final = Framing.UNTIL_CLOSE


def request_framing(chunked: bool, content_length: int) -> Framing:
    """A request's body: ``chunked`` (the last transfer coding) beats ``content_length``
    (-1: none); with neither there is no body (RFC 9112 6.3, steps 4-6)."""
    if chunked:
        return CHUNKED
    if content_length > 0:
        return LENGTH
    return EMPTY


def response_framing(
    status: int, head_request: bool, coded: bool, chunked: bool, sized: bool
) -> Framing:
    """A response's body, as it comes from the upstream (RFC 9112 6.3).

    ``coded``: it has a ``Transfer-Encoding``; ``chunked``: whose last coding is chunked;
    ``sized``: it has a ``Content-Length``; ``head_request``: it answers a HEAD request.
    """
    # Step 1: some responses never have a body, whatever their headers say: 1xx, 204, 304,
    # and the answer to a HEAD request (its Content-Length describes the GET's body).
    if head_request or status < 200 or status == 204 or status == 304:
        return EMPTY
    # Step 2: Transfer-Encoding beats Content-Length; a last coding other than chunked
    # leaves only the close to end the body.
    if chunked:
        return CHUNKED
    if coded:
        return UNTIL_CLOSE
    # Step 3: Content-Length.
    if sized:
        return LENGTH
    # Step 4: nothing says: the body is what comes until the upstream closes.
    return UNTIL_CLOSE


def relayed_framing(upstream: Framing, client_version: str) -> Framing:
    """How the proxy frames a response it relays to a client speaking ``client_version``:
    an empty or sized body goes as it came; a chunked or read-until-close one is re-chunked
    for an HTTP/1.1 client (so the connection may stay open), and ended by the close for an
    HTTP/1.0 one (which cannot read chunks)."""
    if upstream is EMPTY or upstream is LENGTH:
        return upstream
    return CHUNKED if client_version == "1.1" else UNTIL_CLOSE
