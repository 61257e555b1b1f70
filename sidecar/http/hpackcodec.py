"""HPACK (RFC 7541), the header compression of HTTP/2, written for mypyc: an ``Encoder`` and a
``Decoder`` that the ``h2`` codec takes in place of the ``hpack`` library's (``install``), with
their interface (what ``h2.connection`` calls and sets) and their errors (the ``hpack``
exception classes, which h2 turns into the same GOAWAY as before: PROTOCOL_ERROR, or
ENHANCE_YOUR_CALM for a header list above ``max_header_list_size``).

The ``hpack`` library is pure Python and its three blocks decoded and three encoded are a
fifth of a unary gRPC call through the sidecar (``bench_h2_library``). Here:
  * the static table (Appendix A) and the dynamic table (2.3, 4), which the encoder also keeps
    as dicts (name, and name and value, to the newest entry), not a walk of the table;
  * integers on an N-bit prefix (5.1), at most 5 bytes after the prefix, as ``hpack``;
  * string literals (5.2), Huffman-coded by the code of Appendix B (``_HUFFMAN_CODES``) and
    decoded by a 4-bit state machine made from it at import: 256 states (the code tree's
    inner nodes), 16 moves each; a string that holds EOS, or ends on padding longer than 7
    bits or not all ones, is refused (5.2);
  * what the encoder writes is what ``hpack``'s writes, byte for byte (incremental indexing
    unless never-indexed, Huffman always), but for table size updates: the smallest size
    since the last block and the last one (4.2), not each change;
  * what the decoder returns: ``(name, value)`` pairs of bytes, a field that came
    never-indexed (6.2.3) as a ``hpack.NeverIndexedHeaderTuple``, which the encoder, like
    ``hpack``'s, never adds to the table (it sends one the table holds already as indexed).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, cast

from h2.connection import H2Connection
from hpack import Decoder as LibraryDecoder
from hpack import Encoder as LibraryEncoder
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)

#: a field to encode: a pair of bytes (or of str, sent UTF-8), or a ``hpack.HeaderTuple``
Field = HeaderTuple | tuple[bytes, bytes] | tuple[str, str]
#: a decoded field: a pair of bytes (of str when ``decode`` is not asked for ``raw``), or a
#: ``NeverIndexedHeaderTuple``
Decoded = NeverIndexedHeaderTuple | tuple[bytes, bytes] | tuple[str, str]

#: the dynamic table's size until a SETTINGS_HEADER_TABLE_SIZE says otherwise (RFC 9113 6.5.2)
DEFAULT_TABLE_SIZE: Final = 4096
#: ``hpack``'s default limit of a header list's size (its fields' sizes, as 4.1 counts them)
DEFAULT_MAX_HEADER_LIST_SIZE: Final = 1 << 16
#: what an entry costs in the table beyond its name and value (4.1)
_ENTRY_OVERHEAD: Final = 32
#: bytes an integer may take after its prefix (``hpack``'s limit: 5.1 lets an implementation
#: set one)
_INTEGER_BYTES: Final = 5

# fmt: off
#: the static table (Appendix A): index 1 first
_STATIC: Final[tuple[tuple[bytes, bytes], ...]] = (
    (b":authority", b""), (b":method", b"GET"), (b":method", b"POST"), (b":path", b"/"),
    (b":path", b"/index.html"), (b":scheme", b"http"), (b":scheme", b"https"),
    (b":status", b"200"), (b":status", b"204"), (b":status", b"206"), (b":status", b"304"),
    (b":status", b"400"), (b":status", b"404"), (b":status", b"500"),
    (b"accept-charset", b""), (b"accept-encoding", b"gzip, deflate"),
    (b"accept-language", b""), (b"accept-ranges", b""), (b"accept", b""),
    (b"access-control-allow-origin", b""), (b"age", b""), (b"allow", b""),
    (b"authorization", b""), (b"cache-control", b""), (b"content-disposition", b""),
    (b"content-encoding", b""), (b"content-language", b""), (b"content-length", b""),
    (b"content-location", b""), (b"content-range", b""), (b"content-type", b""),
    (b"cookie", b""), (b"date", b""), (b"etag", b""), (b"expect", b""), (b"expires", b""),
    (b"from", b""), (b"host", b""), (b"if-match", b""), (b"if-modified-since", b""),
    (b"if-none-match", b""), (b"if-range", b""), (b"if-unmodified-since", b""),
    (b"last-modified", b""), (b"link", b""), (b"location", b""), (b"max-forwards", b""),
    (b"proxy-authenticate", b""), (b"proxy-authorization", b""), (b"range", b""),
    (b"referer", b""), (b"refresh", b""), (b"retry-after", b""), (b"server", b""),
    (b"set-cookie", b""), (b"strict-transport-security", b""), (b"transfer-encoding", b""),
    (b"user-agent", b""), (b"vary", b""), (b"via", b""), (b"www-authenticate", b""),
)
#: the Huffman code (Appendix B): (code, its length in bits) of each symbol, EOS (256) last
_HUFFMAN_CODES: Final[tuple[tuple[int, int], ...]] = (
    (0x1ff8, 13), (0x7fffd8, 23), (0xfffffe2, 28), (0xfffffe3, 28), (0xfffffe4, 28),
    (0xfffffe5, 28), (0xfffffe6, 28), (0xfffffe7, 28), (0xfffffe8, 28), (0xffffea, 24),
    (0x3ffffffc, 30), (0xfffffe9, 28), (0xfffffea, 28), (0x3ffffffd, 30), (0xfffffeb, 28),
    (0xfffffec, 28), (0xfffffed, 28), (0xfffffee, 28), (0xfffffef, 28), (0xffffff0, 28),
    (0xffffff1, 28), (0xffffff2, 28), (0x3ffffffe, 30), (0xffffff3, 28), (0xffffff4, 28),
    (0xffffff5, 28), (0xffffff6, 28), (0xffffff7, 28), (0xffffff8, 28), (0xffffff9, 28),
    (0xffffffa, 28), (0xffffffb, 28), (0x14, 6), (0x3f8, 10), (0x3f9, 10),
    (0xffa, 12), (0x1ff9, 13), (0x15, 6), (0xf8, 8), (0x7fa, 11),
    (0x3fa, 10), (0x3fb, 10), (0xf9, 8), (0x7fb, 11), (0xfa, 8),
    (0x16, 6), (0x17, 6), (0x18, 6), (0x0, 5), (0x1, 5),
    (0x2, 5), (0x19, 6), (0x1a, 6), (0x1b, 6), (0x1c, 6),
    (0x1d, 6), (0x1e, 6), (0x1f, 6), (0x5c, 7), (0xfb, 8),
    (0x7ffc, 15), (0x20, 6), (0xffb, 12), (0x3fc, 10), (0x1ffa, 13),
    (0x21, 6), (0x5d, 7), (0x5e, 7), (0x5f, 7), (0x60, 7),
    (0x61, 7), (0x62, 7), (0x63, 7), (0x64, 7), (0x65, 7),
    (0x66, 7), (0x67, 7), (0x68, 7), (0x69, 7), (0x6a, 7),
    (0x6b, 7), (0x6c, 7), (0x6d, 7), (0x6e, 7), (0x6f, 7),
    (0x70, 7), (0x71, 7), (0x72, 7), (0xfc, 8), (0x73, 7),
    (0xfd, 8), (0x1ffb, 13), (0x7fff0, 19), (0x1ffc, 13), (0x3ffc, 14),
    (0x22, 6), (0x7ffd, 15), (0x3, 5), (0x23, 6), (0x4, 5),
    (0x24, 6), (0x5, 5), (0x25, 6), (0x26, 6), (0x27, 6),
    (0x6, 5), (0x74, 7), (0x75, 7), (0x28, 6), (0x29, 6),
    (0x2a, 6), (0x7, 5), (0x2b, 6), (0x76, 7), (0x2c, 6),
    (0x8, 5), (0x9, 5), (0x2d, 6), (0x77, 7), (0x78, 7),
    (0x79, 7), (0x7a, 7), (0x7b, 7), (0x7ffe, 15), (0x7fc, 11),
    (0x3ffd, 14), (0x1ffd, 13), (0xffffffc, 28), (0xfffe6, 20), (0x3fffd2, 22),
    (0xfffe7, 20), (0xfffe8, 20), (0x3fffd3, 22), (0x3fffd4, 22), (0x3fffd5, 22),
    (0x7fffd9, 23), (0x3fffd6, 22), (0x7fffda, 23), (0x7fffdb, 23), (0x7fffdc, 23),
    (0x7fffdd, 23), (0x7fffde, 23), (0xffffeb, 24), (0x7fffdf, 23), (0xffffec, 24),
    (0xffffed, 24), (0x3fffd7, 22), (0x7fffe0, 23), (0xffffee, 24), (0x7fffe1, 23),
    (0x7fffe2, 23), (0x7fffe3, 23), (0x7fffe4, 23), (0x1fffdc, 21), (0x3fffd8, 22),
    (0x7fffe5, 23), (0x3fffd9, 22), (0x7fffe6, 23), (0x7fffe7, 23), (0xffffef, 24),
    (0x3fffda, 22), (0x1fffdd, 21), (0xfffe9, 20), (0x3fffdb, 22), (0x3fffdc, 22),
    (0x7fffe8, 23), (0x7fffe9, 23), (0x1fffde, 21), (0x7fffea, 23), (0x3fffdd, 22),
    (0x3fffde, 22), (0xfffff0, 24), (0x1fffdf, 21), (0x3fffdf, 22), (0x7fffeb, 23),
    (0x7fffec, 23), (0x1fffe0, 21), (0x1fffe1, 21), (0x3fffe0, 22), (0x1fffe2, 21),
    (0x7fffed, 23), (0x3fffe1, 22), (0x7fffee, 23), (0x7fffef, 23), (0xfffea, 20),
    (0x3fffe2, 22), (0x3fffe3, 22), (0x3fffe4, 22), (0x7ffff0, 23), (0x3fffe5, 22),
    (0x3fffe6, 22), (0x7ffff1, 23), (0x3ffffe0, 26), (0x3ffffe1, 26), (0xfffeb, 20),
    (0x7fff1, 19), (0x3fffe7, 22), (0x7ffff2, 23), (0x3fffe8, 22), (0x1ffffec, 25),
    (0x3ffffe2, 26), (0x3ffffe3, 26), (0x3ffffe4, 26), (0x7ffffde, 27), (0x7ffffdf, 27),
    (0x3ffffe5, 26), (0xfffff1, 24), (0x1ffffed, 25), (0x7fff2, 19), (0x1fffe3, 21),
    (0x3ffffe6, 26), (0x7ffffe0, 27), (0x7ffffe1, 27), (0x3ffffe7, 26), (0x7ffffe2, 27),
    (0xfffff2, 24), (0x1fffe4, 21), (0x1fffe5, 21), (0x3ffffe8, 26), (0x3ffffe9, 26),
    (0xffffffd, 28), (0x7ffffe3, 27), (0x7ffffe4, 27), (0x7ffffe5, 27), (0xfffec, 20),
    (0xfffff3, 24), (0xfffed, 20), (0x1fffe6, 21), (0x3fffe9, 22), (0x1fffe7, 21),
    (0x1fffe8, 21), (0x7ffff3, 23), (0x3fffea, 22), (0x3fffeb, 22), (0x1ffffee, 25),
    (0x1ffffef, 25), (0xfffff4, 24), (0xfffff5, 24), (0x3ffffea, 26), (0x7ffff4, 23),
    (0x3ffffeb, 26), (0x7ffffe6, 27), (0x3ffffec, 26), (0x3ffffed, 26), (0x7ffffe7, 27),
    (0x7ffffe8, 27), (0x7ffffe9, 27), (0x7ffffea, 27), (0x7ffffeb, 27), (0xffffffe, 28),
    (0x7ffffec, 27), (0x7ffffed, 27), (0x7ffffee, 27), (0x7ffffef, 27), (0x7fffff0, 27),
    (0x3ffffee, 26), (0x3fffffff, 30),
)
# fmt: on

_STATIC_LENGTH: Final = 61  # (a literal: compiled, a name bound to an expression is looked up)
assert len(_STATIC) == _STATIC_LENGTH
#: the static index of each name (its first), and of each name and value
_STATIC_NAMES: Final = {name: len(_STATIC) - i for i, (name, _) in enumerate(reversed(_STATIC))}
_STATIC_FIELDS: Final[dict[bytes, dict[bytes, int]]] = {name: {} for name, _ in _STATIC}
for _index, (_name, _value) in enumerate(_STATIC, 1):
    _STATIC_FIELDS[_name][_value] = _index
#: each byte as a bytes object of its own
_BYTES: Final = [bytes((_byte,)) for _byte in range(256)]
#: each byte's Huffman code, as (code << 5) | its length
_ENCODING: Final = [(_code << 5) | _length for _code, _length in _HUFFMAN_CODES[:256]]

#: a move of the Huffman decoder: its next state (the low 8 bits), and these flags
_EMIT: Final = 1 << 8  # a symbol was completed: the bits above this one hold it
_FAIL: Final = 1 << 17  # EOS was completed
_SYMBOL_SHIFT: Final = 9


def _decoding_machine() -> tuple[list[int], list[bool]]:
    """The Huffman decoder's moves (by ``state << 4 | nibble``) and the states it may end in.

    A state is an inner node of the code's tree (the root, 0, once a symbol is done). A
    string may end at the root, or on the path of 1 bits from it up to 7 deep (the padding:
    the first bits of EOS, 5.2)."""
    children = [0, 0]  # 2 * node + bit: an inner node (> 0), or ~symbol for a leaf
    for symbol, (code, length) in enumerate(_HUFFMAN_CODES):
        node = 0
        for shift in range(length - 1, 0, -1):
            slot = 2 * node + ((code >> shift) & 1)
            if not children[slot]:
                children[slot] = len(children) // 2
                children += [0, 0]
            node = children[slot]
        children[2 * node + (code & 1)] = ~symbol
    ends = [False] * (len(children) // 2)
    node = 0
    for _ in range(8):
        ends[node] = True
        node = children[2 * node + 1]
    moves: list[int] = []
    for state in range(len(children) // 2):
        for nibble in range(16):
            node, flags = state, 0
            for shift in (3, 2, 1, 0):
                child = children[2 * node + ((nibble >> shift) & 1)]
                if child >= 0:
                    node = child
                elif ~child == 256:
                    flags, node = _FAIL, 0
                    break
                else:
                    flags, node = _EMIT | (~child << _SYMBOL_SHIFT), 0
            moves.append(flags | node)
    return moves, ends


_MOVES, _ENDS = _decoding_machine()


def huffman_encode(data: bytes) -> bytes:
    """``data`` Huffman-coded, padded with the first bits of EOS (5.2)."""
    out: list[int] = []
    encoding = _ENCODING  # (a module's global is a dict lookup each time, compiled)
    bits = held = 0  # ``held``: the ``bits`` low bits not yet written
    for i in range(len(data)):
        code = encoding[data[i]]
        length = code & 31
        held = (held << length) | (code >> 5)
        bits += length
        while bits >= 8:
            bits -= 8
            out.append((held >> bits) & 0xFF)
        held &= (1 << bits) - 1
    if bits:
        out.append(((held << (8 - bits)) | (0xFF >> bits)) & 0xFF)
    return bytes(out)


def huffman_decode(data: bytes, start: int, end: int) -> bytes:
    """The Huffman-coded string ``data[start:end]`` decoded; HPACKDecodingError if it holds
    EOS or ends on bad padding (5.2)."""
    out: list[int] = []
    moves = _MOVES  # (a module's global is a dict lookup each time, compiled)
    state = 0
    for i in range(start, end):
        byte = data[i]
        move = moves[(state << 4) | (byte >> 4)]
        if move & (_EMIT | _FAIL):
            if move & _FAIL:
                raise HPACKDecodingError("Invalid Huffman string: EOS")
            out.append(move >> _SYMBOL_SHIFT)
        move = moves[((move & 0xFF) << 4) | (byte & 0x0F)]
        if move & (_EMIT | _FAIL):
            if move & _FAIL:
                raise HPACKDecodingError("Invalid Huffman string: EOS")
            out.append(move >> _SYMBOL_SHIFT)
        state = move & 0xFF
    if not _ENDS[state]:
        raise HPACKDecodingError("Incomplete Huffman string: bad padding")
    return bytes(out)


def encode_integer(value: int, prefix: int, flags: int) -> bytes:
    """``value`` on the ``prefix`` low bits of a first byte that also holds ``flags`` (5.1)."""
    most = (1 << prefix) - 1
    if value < most:
        return _BYTES[flags | value]
    out = [flags | most]
    value -= most
    while value >= 128:
        out.append((value & 127) | 128)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_integer(data: bytes, at: int, prefix: int) -> tuple[int, int]:
    """The integer on the ``prefix`` low bits of ``data[at]`` and after (5.1), and where what
    follows it starts."""
    if at >= len(data):
        raise HPACKDecodingError("Truncated header block: an integer expected")
    most = (1 << prefix) - 1
    value = data[at] & most
    at += 1
    if value < most:
        return value, at
    shift = 0
    while True:
        if at >= len(data):
            raise HPACKDecodingError("Truncated header block: an integer cut short")
        byte = data[at]
        at += 1
        value += (byte & 127) << shift
        if byte < 128:
            return value, at
        shift += 7
        if shift >= 7 * _INTEGER_BYTES:
            raise HPACKDecodingError(f"Integer representation longer than {_INTEGER_BYTES + 1}")


def _decode_string(data: bytes, at: int) -> tuple[bytes, int]:
    """The string literal at ``data[at]`` (5.2), and where what follows it starts."""
    length, start = decode_integer(data, at, 7)
    end = start + length
    if end > len(data):
        raise HPACKDecodingError("Truncated header block: a string cut short")
    if data[at] & 0x80:
        return huffman_decode(data, start, end), end
    return data[start:end], end


class HeaderTable:
    """The dynamic table (2.3.2, 4): its entries oldest first, their size (each 32 bytes more
    than its name and value, 4.1) kept within ``max_size`` by evicting the oldest. An
    encoder's (``indexed``) also finds a field's entry by its name and value."""

    def __init__(self, indexed: bool) -> None:
        self.entries: list[tuple[bytes, bytes]] = []
        self.size = 0
        self.max_size = DEFAULT_TABLE_SIZE
        self.indexed = indexed
        self.added = 0  # entries ever added: entry ``added - 1`` is the newest
        self.static = _STATIC  # (compiled, a module's global is a dict lookup each use)
        self._values: dict[bytes, dict[bytes, int]] = {}  # name, value: newest entry's number
        self._names: dict[bytes, int] = {}  # name: the newest entry's number

    def __repr__(self) -> str:
        return f"<HeaderTable {len(self.entries)} entries, {self.size}/{self.max_size} bytes>"

    def get(self, index: int) -> tuple[bytes, bytes]:
        """The field at ``index`` of the whole table, static first (2.3.3)."""
        if 0 < index <= _STATIC_LENGTH:
            return self.static[index - 1]
        back = index - _STATIC_LENGTH  # 1: the newest entry
        if index <= 0 or back > len(self.entries):
            raise InvalidTableIndexError(f"Invalid table index {index}")
        return self.entries[len(self.entries) - back]

    def find(self, name: bytes, value: bytes) -> int:
        """The index of the newest entry holding ``name`` and ``value``, or 0."""
        values = self._values.get(name)
        if values is None:
            return 0
        number = values.get(value, -1)
        return 0 if number < 0 else _STATIC_LENGTH + self.added - number

    def find_name(self, name: bytes) -> int:
        """The index of the newest entry named ``name``, or 0."""
        number = self._names.get(name, -1)
        return 0 if number < 0 else _STATIC_LENGTH + self.added - number

    def add(self, name: bytes, value: bytes) -> None:
        """Add a field as the newest entry, evicting as 4.4 says (all of them for one larger
        than the table)."""
        size = _ENTRY_OVERHEAD + len(name) + len(value)
        if size > self.max_size:
            self.entries.clear()
            self._values.clear()
            self._names.clear()
            self.size = 0
            return
        if self.indexed:
            self._values.setdefault(name, {})[value] = self.added
            self._names[name] = self.added
        self.entries.append((name, value))
        self.added += 1
        self.size += size
        self._fit()

    def resize(self, max_size: int) -> None:
        self.max_size = max_size
        self._fit()

    def _fit(self) -> None:
        while self.size > self.max_size:
            number = self.added - len(self.entries)
            name, value = self.entries.pop(0)
            self.size -= _ENTRY_OVERHEAD + len(name) + len(value)
            if self.indexed:
                values = self._values[name]
                if values[value] == number:
                    del values[value]
                    if not values:
                        del self._values[name]
                if self._names[name] == number:
                    del self._names[name]


class Encoder:
    """Header lists to header blocks, for one connection's sending side (``hpack.Encoder``'s
    interface: ``encode`` and ``header_table_size``)."""

    def __init__(self) -> None:
        self.table = HeaderTable(True)
        self._resized = False  # a size update is due at the next block's start
        self._smallest = 0  # the smallest size set since the last block
        # the module's tables held here (compiled, a module's global is a dict lookup each use)
        self._static_fields = _STATIC_FIELDS
        self._static_names = _STATIC_NAMES
        self._bytes = _BYTES
        self._never: type[NeverIndexedHeaderTuple] = NeverIndexedHeaderTuple

    def __repr__(self) -> str:
        return f"<hpackcodec.Encoder {self.table!r}>"

    @property
    def header_table_size(self) -> int:
        """The dynamic table's size (bytes): the peer's SETTINGS_HEADER_TABLE_SIZE."""
        return self.table.max_size

    @header_table_size.setter
    def header_table_size(self, size: int) -> None:
        # A peer's SETTINGS_HEADER_TABLE_SIZE is the most it lets the table hold, not what it
        # must: past 4 KiB a client could make every connection keep whatever fields it is
        # sent (up to 4 GiB each). The table stays within 4 KiB, as nghttp2's and Envoy's do.
        size = min(size, DEFAULT_TABLE_SIZE)
        if size == self.table.max_size:
            return
        self._smallest = min(self._smallest, size) if self._resized else size
        self._resized = True
        self.table.resize(size)

    def encode(self, headers: Iterable[Field], huffman: bool = True) -> bytes:
        """The header block of ``headers`` (pseudo-headers first, the caller's duty)."""
        out: list[bytes] = []
        if self._resized:
            self._resized = False
            if self._smallest < self.table.max_size:
                out.append(self._integer(self._smallest, 5, 0x20))
            out.append(self._integer(self.table.max_size, 5, 0x20))
        for field in headers:
            name, value = field[0], field[1]
            self._add(
                out,
                name if isinstance(name, bytes) else name.encode(),
                value if isinstance(value, bytes) else value.encode(),
                isinstance(field, self._never),
                huffman,
            )
        return b"".join(out)

    def _add(self, out: list[bytes], name: bytes, value: bytes, never: bool, huffman: bool) -> None:
        """One field: indexed if the table holds it (6.1), else a literal (6.2) with an
        indexed name if it holds the name, added to the table unless ``never``."""
        static = self._static_fields.get(name)
        index = 0 if static is None else static.get(value, 0)
        if not index:
            index = self.table.find(name, value)
        if index:
            out.append(self._integer(index, 7, 0x80))
            return
        index = self._static_names.get(name, 0) or self.table.find_name(name)
        if index:
            out.append(self._integer(index, 4, 0x10) if never else self._integer(index, 6, 0x40))
        else:
            out.append(b"\x10" if never else b"\x40")
            self._string(out, name, huffman)
        self._string(out, value, huffman)
        if not never:
            self.table.add(name, value)

    def _integer(self, value: int, prefix: int, flags: int) -> bytes:
        if value < (1 << prefix) - 1:
            return self._bytes[flags | value]
        return encode_integer(value, prefix, flags)

    def _string(self, out: list[bytes], data: bytes, huffman: bool) -> None:
        if huffman:
            data = huffman_encode(data)
            out.append(self._integer(len(data), 7, 0x80))
        else:
            out.append(self._integer(len(data), 7, 0))
        out.append(data)


class Decoder:
    """Header blocks to header lists, for one connection's receiving side (``hpack.Decoder``'s
    interface: ``decode``, ``header_table_size``, ``max_header_list_size`` and
    ``max_allowed_table_size``)."""

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.table = HeaderTable(False)
        #: bytes (4.1's count) a decoded list may hold: OversizedHeaderListError past it
        self.max_header_list_size = max_header_list_size
        #: the table size the peer may set (bytes): our acknowledged SETTINGS_HEADER_TABLE_SIZE
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE

    def __repr__(self) -> str:
        return f"<hpackcodec.Decoder {self.table!r}>"

    @property
    def header_table_size(self) -> int:
        """The dynamic table's size (bytes), as the peer's last size update set it."""
        return self.table.max_size

    @header_table_size.setter
    def header_table_size(self, size: int) -> None:
        self.table.resize(size)

    def decode(self, data: bytes, raw: bool = False) -> list[Decoded]:
        """The fields of a whole header block, bytes if ``raw`` and UTF-8 text otherwise.
        HPACKDecodingError (or its subclasses) for a block that breaks RFC 7541 or a limit:
        the connection's table is then no longer usable."""
        headers: list[Decoded] = []
        table = self.table
        at = 0
        inflated = 0  # the list's size as 4.1 counts it
        while at < len(data):
            first = data[at]
            never = False
            if first & 0x80:  # indexed (6.1)
                index, at = decode_integer(data, at, 7)
                if not index:
                    raise InvalidTableIndexError("Invalid table index 0")
                name, value = table.get(index)
            elif first & 0x40:  # literal, added to the table (6.2.1)
                name, value, at = self._literal(data, at, 6)
                table.add(name, value)
            elif first & 0x20:  # table size update (6.3)
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                size, at = decode_integer(data, at, 5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                table.resize(size)
                continue
            else:  # literal, not added: never indexed (6.2.3) or not this time (6.2.2)
                never = bool(first & 0x10)
                name, value, at = self._literal(data, at, 4)
            inflated += _ENTRY_OVERHEAD + len(name) + len(value)
            if inflated > self.max_header_list_size:
                raise OversizedHeaderListError(
                    f"A header list larger than {self.max_header_list_size} has been received"
                )
            if never:  # (apart: one expression of both types would be a plain tuple compiled)
                headers.append(NeverIndexedHeaderTuple(name, value))
            else:
                headers.append((name, value))
        if table.max_size > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        return headers if raw else _as_text(headers)

    def _literal(self, data: bytes, at: int, prefix: int) -> tuple[bytes, bytes, int]:
        """A literal field (6.2) whose name's index is on ``prefix`` bits: its name, value and
        where what follows it starts."""
        index, at = decode_integer(data, at, prefix)
        if index:
            name = self.table.get(index)[0]
        else:
            name, at = _decode_string(data, at)
        value, at = _decode_string(data, at)
        return name, value, at


def _as_text(headers: list[Decoded]) -> list[Decoded]:
    """Decoded fields as text (``decode`` not asked for ``raw``, as h2 never does)."""
    text: list[Decoded] = []
    try:
        for field in headers:
            name, value = cast(bytes, field[0]), cast(bytes, field[1])
            if isinstance(field, NeverIndexedHeaderTuple):
                text.append(NeverIndexedHeaderTuple(name.decode(), value.decode()))
            else:
                text.append((name.decode(), value.decode()))
    except UnicodeDecodeError as e:
        raise HPACKDecodingError("Unable to decode headers as UTF-8") from e
    return text


def install(conn: H2Connection) -> None:
    """Give a new ``conn`` this module's encoder and decoder, in place of the ``hpack``
    library's, with their limits (before any header block: the tables start empty)."""
    decoder = Decoder(conn.decoder.max_header_list_size)
    decoder.max_allowed_table_size = conn.decoder.max_allowed_table_size
    conn.encoder = cast(LibraryEncoder, Encoder())
    conn.decoder = cast(LibraryDecoder, decoder)
