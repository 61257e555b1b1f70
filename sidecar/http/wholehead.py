"""Response heads that came whole in one read, classified from their bytes.

Nearly every upstream answer starts a read with its whole head: the status line, a handful
of headers and the blank line, often with the body behind them. Read line by line, each
header costs a parser callback into Python, a table lookup and a formatted line: most of the
work of relaying such a head. Read whole, the head is lowered once, the hop-by-hop lines are
found with one search, and what is forwarded is the head's own bytes, cut where those lines
were.

This applies only where it decides as the line-by-line reading (``http1.ResponseHead.add``)
does: a final response (2xx to 5xx) of HTTP/1.1, without ``Transfer-Encoding`` (chunked
bodies may end with trailers, which only the parser's callbacks see), within the head limits.
Everything else is read line by line. The upstream connection parses the
same bytes with a parser that has no header callbacks: llhttp still checks the head, and the
head classified here is used only once it has (``on_headers_complete``). llhttp refuses
whitespace around header names, bare CR or LF and folded lines, so in a head it accepts a
header's line starts right after a CRLF, with its name and a colon: what the searches below
look for.
"""

from __future__ import annotations

import re
from typing import Final

from sidecar.http.framing import response_framing
from sidecar.http.headers import KEPT_TOKENS, connection_tokens
from sidecar.http.http1 import MAX_HEAD_BYTES, MAX_HEADERS, ResponseHead

#: the header lines no response forwards: hop-by-hop (RFC 9110 7.6.1) and ``Proxy-*``
#: (``Transfer-Encoding`` is never here: such a head is read line by line)
#: (a match is the whole line, but its CRLF; group 1 is its value)
_HOP_BY_HOP: Final = re.compile(
    rb"\r\n(?:connection|keep-alive|te|trailer|upgrade|proxy-[^:]*):([^\r]*)"
)
_NONE: Final[frozenset[bytes]] = frozenset()
#: the final statuses a head read whole may have, by the start of their status line (one
#: lookup costs less than ``isdigit``, comparisons and ``int``; 1xx are interim, one head
#: among several)
_FINAL: Final = {b"HTTP/1.1 %d" % status: status for status in range(200, 1000)}
#: ``response_framing`` of each of those statuses, read whole (no Transfer-Encoding, not the
#: answer to a HEAD request: the exchange knows that), with a Content-Length and without:
#: asked once here, a lookup a head instead of a call
_SIZED: Final = {
    status: response_framing(status, False, False, False, True) for status in _FINAL.values()
}
_UNSIZED: Final = {
    status: response_framing(status, False, False, False, False) for status in _FINAL.values()
}
#: a head this short has at most ``MAX_HEADERS`` lines (each at least ``a:`` and its CRLF)
_FEW_LINES: Final = 4 * MAX_HEADERS


def whole_response_head(data: bytes, resp: ResponseHead) -> bool:
    """Read the head that ``data`` (a read that begins with a response) starts with into
    ``resp`` (a head made once per connection: its other fields keep what it was made with),
    when it is all there and may be read whole; False: read it line by line."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or end > MAX_HEAD_BYTES:
        return False
    if data[:17] == b"HTTP/1.1 200 OK\r\n":  # (nearly every status line: read at once)
        status, eol, reason = 200, 15, b"OK"
    else:
        status = _FINAL.get(data[:12], 0)
        if not status:
            return False
        eol = data.find(b"\r\n", 12)
        reason = data[13:eol] if data[12] == 0x20 else b""  # (0x20: " ")
    raw = data[eol : end + 2]  # every header line after a CRLF, the last with its own
    low = raw.lower()
    # (find, not ``in``: CPython's ``in`` tries its operand as a byte value first, and makes
    # and clears an exception doing so; and two finds cost less than one more regex branch)
    sized = low.find(b"\r\ncontent-length:") >= 0
    # llhttp refuses a Transfer-Encoding beside a Content-Length, before the head is used:
    # only a head without a length is searched for one
    if not sized and low.find(b"\r\ntransfer-encoding:") >= 0:
        return False
    if len(raw) > _FEW_LINES and raw.count(b"\r\n") > MAX_HEADERS + 1:
        return False  # (too many: the line-by-line reading refuses it, saying so)
    resp.status = status
    resp.reason = reason
    resp.sized = sized
    resp.close = False
    cuts: list[tuple[int, int]] = []
    custom = _NONE
    found = _HOP_BY_HOP.search(low)  # (search again and again: finditer costs more)
    while found is not None:
        at, line_end = found.span()
        cuts.append((at, line_end))  # the CRLF before the line, and the line
        if low[at + 2] == 0x63:  # "c": Connection, whose value may name more lines
            listed = found[1]
            if listed != b" keep-alive":  # (what nearly every response says, as it says it)
                listed = listed.strip()
                if listed != b"keep-alive":
                    tokens = connection_tokens(listed)
                    resp.close = resp.close or b"close" in tokens
                    if not tokens <= KEPT_TOKENS:
                        custom |= tokens - KEPT_TOKENS
        found = _HOP_BY_HOP.search(low, line_end)
    if custom:
        _cut_named(low, custom, cuts)
    if not cuts:
        resp.lines = [raw[2:]]
    elif len(cuts) == 1:  # (the lines before it and after it, joined when the head goes)
        at, line_end = cuts[0]
        resp.lines = [raw[2 : at + 2], raw[line_end + 2 :]] if at else [raw[line_end + 2 :]]
    else:
        resp.lines = [_without(raw, cuts)]
    resp.framing = _SIZED[status] if sized else _UNSIZED[status]
    return True


def _cut_named(low: bytes, names: frozenset[bytes], cuts: list[tuple[int, int]]) -> None:
    """Add the lines of the headers ``Connection`` names (lowercase) to ``cuts``."""
    for name in names:
        needle = b"\r\n" + name + b":"
        at = low.find(needle)
        while at >= 0:
            line_end = low.find(b"\r\n", at + len(needle))
            cuts.append((at, line_end))
            at = low.find(needle, line_end)


def _without(raw: bytes, cuts: list[tuple[int, int]]) -> bytes:
    """The header lines of ``raw`` without those at ``cuts`` (a line may be there twice:
    a hop-by-hop header that ``Connection`` names too)."""
    pieces = []
    pos = 0
    for at, line_end in sorted(cuts):
        if at >= pos:
            pieces.append(raw[pos:at])
            pos = line_end
    pieces.append(raw[pos:])
    return b"".join(pieces)[2:]
