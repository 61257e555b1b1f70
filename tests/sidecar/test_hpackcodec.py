"""The compiled HPACK codec: RFC 7541's examples (Appendix C), the ``hpack`` library's
encoder and decoder on the other side (same bytes, same fields, same errors), every malformed
block refused with hpack's exception, and h2 running on it."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, RequestReceived, ResponseReceived
from h2.exceptions import DenialOfServiceError, ProtocolError
from hpack import Decoder as LibraryDecoder
from hpack import Encoder as LibraryEncoder
from hpack import HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndexError,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hyperframe.frame import HeadersFrame
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.http import hpackcodec
from sidecar.http.hpackcodec import Decoded, Decoder, Encoder, Field

Fields = list[tuple[bytes, bytes]]

# -- RFC 7541 Appendix C ------------------------------------------------------------------

REQUESTS: list[Fields] = [
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com")],
    [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
     (b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html"),
     (b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
]  # fmt: skip
#: the dynamic table after each request: (entries newest first, size)
REQUEST_TABLES: list[tuple[Fields, int]] = [
    ([(b":authority", b"www.example.com")], 57),
    ([(b"cache-control", b"no-cache"), (b":authority", b"www.example.com")], 110),
    ([(b"custom-key", b"custom-value"), (b"cache-control", b"no-cache"),
      (b":authority", b"www.example.com")], 164),
]  # fmt: skip
C3 = [  # without Huffman
    "828684410f7777772e6578616d706c652e636f6d",
    "828684be58086e6f2d6361636865",
    "828785bf400a637573746f6d2d6b65790c637573746f6d2d76616c7565",
]
C4 = [  # with Huffman
    "828684418cf1e3c2e5f23a6ba0ab90f4ff",
    "828684be5886a8eb10649cbf",
    "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
]
DATE1, DATE2 = b"Mon, 21 Oct 2013 20:13:21 GMT", b"Mon, 21 Oct 2013 20:13:22 GMT"
COOKIE = b"foo=ASDJKHQKBZXOQWEOPIUAXQWEOIU; max-age=3600; version=1"
LOCATION = b"https://www.example.com"
RESPONSES: list[Fields] = [
    [(b":status", b"302"), (b"cache-control", b"private"), (b"date", DATE1),
     (b"location", LOCATION)],
    [(b":status", b"307"), (b"cache-control", b"private"), (b"date", DATE1),
     (b"location", LOCATION)],
    [(b":status", b"200"), (b"cache-control", b"private"), (b"date", DATE2),
     (b"location", LOCATION), (b"content-encoding", b"gzip"), (b"set-cookie", COOKIE)],
]  # fmt: skip
RESPONSE_TABLES: list[tuple[Fields, int]] = [
    ([(b"location", LOCATION), (b"date", DATE1), (b"cache-control", b"private"),
      (b":status", b"302")], 222),
    ([(b":status", b"307"), (b"location", LOCATION), (b"date", DATE1),
      (b"cache-control", b"private")], 222),
    ([(b"set-cookie", COOKIE), (b"content-encoding", b"gzip"), (b"date", DATE2)], 215),
]  # fmt: skip
C5 = [  # without Huffman, a table of 256 bytes
    "4803333032580770726976617465611d4d6f6e2c203231204f637420323031332032303a31333a323120474d"
    "546e1768747470733a2f2f7777772e6578616d706c652e636f6d",
    "4803333037c1c0bf",
    "88c1611d4d6f6e2c203231204f637420323031332032303a31333a323220474d54c05a04677a69707738666f"
    "6f3d4153444a4b48514b425a584f5157454f50495541585157454f49553b206d61782d6167653d333630303b"
    "2076657273696f6e3d31",
]
C6 = [  # with Huffman, a table of 256 bytes
    "488264025885aec3771a4b6196d07abe941054d444a8200595040b8166e082a62d1bff6e919d29ad171863c7"
    "8f0b97c8e9ae82ae43d3",
    "4883640effc1c0bf",
    "88c16196d07abe941054d444a8200595040b8166e084a62d1bffc05a839bd9ab77ad94e7821dd7f2e6c7b335"
    "dfdfcd5b3960d5af27087f3672c1ab270fb5291f9587316065c003ed4ee5b1063d5007",
]


def table_of(table: hpackcodec.HeaderTable) -> tuple[Fields, int]:
    return list(reversed(table.entries)), table.size


def sized(size: int) -> tuple[Encoder, Decoder]:
    """An encoder and a decoder whose tables are ``size`` bytes (as after SETTINGS)."""
    encoder, decoder = Encoder(), Decoder()
    encoder.header_table_size = size
    update = b"" if size == 4096 else hpackcodec.encode_integer(size, 5, 0x20)
    assert encoder.encode([]) == update
    decoder.max_allowed_table_size = decoder.header_table_size = size
    return encoder, decoder


@pytest.mark.parametrize(
    ("blocks", "lists", "tables", "size", "huffman"),
    [
        (C3, REQUESTS, REQUEST_TABLES, 4096, False),
        (C4, REQUESTS, REQUEST_TABLES, 4096, True),
        (C5, RESPONSES, RESPONSE_TABLES, 256, False),
        (C6, RESPONSES, RESPONSE_TABLES, 256, True),
    ],
    ids=["C.3", "C.4", "C.5", "C.6"],
)
def test_appendix_c_blocks_both_ways_with_the_tables_after_each(
    blocks: list[str], lists: list[Fields], tables: list[tuple[Fields, int]], size: int,
    huffman: bool,
) -> None:  # fmt: skip
    encoder, decoder = sized(size)
    for block, fields, table in zip(blocks, lists, tables, strict=True):
        assert decoder.decode(bytes.fromhex(block), raw=True) == fields
        assert table_of(decoder.table) == table
        assert encoder.encode(fields, huffman=huffman).hex() == block
        assert table_of(encoder.table) == table


@pytest.mark.parametrize(
    ("block", "field", "kept"),
    [
        ("400a637573746f6d2d6b65790d637573746f6d2d686561646572",
         (b"custom-key", b"custom-header"), True),  # C.2.1
        ("040c2f73616d706c652f70617468", (b":path", b"/sample/path"), False),  # C.2.2
        ("100870617373776f726406736563726574", (b"password", b"secret"), False),  # C.2.3
        ("82", (b":method", b"GET"), False),  # C.2.4
    ],
)  # fmt: skip
def test_appendix_c2_single_fields(block: str, field: tuple[bytes, bytes], kept: bool) -> None:
    decoder = Decoder()
    [decoded] = decoder.decode(bytes.fromhex(block), raw=True)
    assert decoded == field
    assert isinstance(decoded, NeverIndexedHeaderTuple) == (field[0] == b"password")
    assert table_of(decoder.table) == (([field], 32 + len(field[0]) + len(field[1])) if kept
                                       else ([], 0))  # fmt: skip


def test_the_text_form_when_not_raw() -> None:
    assert Decoder().decode(bytes.fromhex(C4[0])) == [
        (":method", "GET"), (":scheme", "http"), (":path", "/"), (":authority", "www.example.com")
    ]  # fmt: skip
    with pytest.raises(HPACKDecodingError):
        Decoder().decode(b"\x00\x01a\x01\xff")  # a value that is not UTF-8
    assert Encoder().encode([(":path", "/ü")]) == LibraryEncoder().encode([(":path", "/ü")])


# -- against the hpack library ------------------------------------------------------------

NAMES = st.sampled_from(
    [b":status", b":path", b"content-type", b"date", b"x-request-id", b"grpc-status", b"cookie",
     b"authorization", b"accept-encoding", b"set-cookie", b"x-a", b"x-b"]
) | st.binary(min_size=1, max_size=40)  # fmt: skip
VALUES = st.sampled_from([b"", b"200", b"gzip, deflate", b"application/grpc", b"0"]) | st.binary(
    max_size=300
)
FIELD = st.tuples(NAMES, VALUES, st.booleans())
BLOCKS = st.lists(st.lists(FIELD, max_size=12), min_size=1, max_size=12)
SIZES = st.sampled_from([0, 64, 256, 1000, 4096])  # (past 4096: ours stays at 4096)


def as_fields(raw: list[tuple[bytes, bytes, bool]]) -> list[Field]:
    return [NeverIndexedHeaderTuple(n, v) if never else (n, v) for n, v, never in raw]


def as_lists(fields: Iterable[Decoded | HeaderTuple]) -> list[tuple[object, object, bool]]:
    """Fields compared with their kind: never-indexed or not."""
    return [(f[0], f[1], isinstance(f, NeverIndexedHeaderTuple)) for f in fields]


def library_decoder() -> LibraryDecoder:
    decoder = LibraryDecoder()
    decoder.max_allowed_table_size = 1 << 20
    decoder.max_header_list_size = 1 << 24
    return decoder


def decoder() -> Decoder:
    ours = Decoder(1 << 24)
    ours.max_allowed_table_size = 1 << 20
    return ours


@settings(max_examples=150, deadline=None)
@given(BLOCKS, st.booleans())
def test_the_same_bytes_as_hpack_and_each_decodes_the_other(
    blocks: list[list[tuple[bytes, bytes, bool]]], huffman: bool
) -> None:
    ours, theirs = Encoder(), LibraryEncoder()
    our_decoder, their_decoder = decoder(), library_decoder()
    for raw in blocks:
        fields = as_fields(raw)
        block = ours.encode(fields, huffman=huffman)
        assert block == theirs.encode(fields, huffman=huffman)
        decoded = our_decoder.decode(block, raw=True)
        assert decoded == fields
        assert as_lists(decoded) == as_lists(their_decoder.decode(block, raw=True))
        assert table_of(our_decoder.table)[0] == list(their_decoder.header_table.dynamic_entries)
        assert table_of(ours.table) == table_of(our_decoder.table)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.lists(FIELD, max_size=8), st.lists(SIZES, max_size=3)), max_size=10))
def test_table_size_changes_between_blocks_both_directions(
    steps: list[tuple[list[tuple[bytes, bytes, bool]], list[int]]],
) -> None:
    ours, theirs = Encoder(), LibraryEncoder()
    our_decoder, their_decoder = decoder(), library_decoder()
    for raw, sizes in steps:
        for size in sizes:
            ours.header_table_size = size
            if size != theirs.header_table_size:  # (hpack forgets earlier changes otherwise)
                theirs.header_table_size = size
        fields = as_fields(raw)
        ours_block, theirs_block = ours.encode(fields), theirs.encode(fields)
        # (a never-indexed field the table holds is sent indexed, by hpack too)
        assert their_decoder.decode(ours_block, raw=True) == fields
        assert our_decoder.decode(theirs_block, raw=True) == fields
        assert our_decoder.header_table_size == ours.header_table_size
        assert table_of(our_decoder.table)[0] == list(their_decoder.header_table.dynamic_entries)


def test_the_encoders_table_stays_within_4_kib_whatever_size_the_peer_allows() -> None:
    """A client's SETTINGS_HEADER_TABLE_SIZE of 4 GiB would have each connection keep every
    field it is sent: the table stays within 4 KiB (nghttp2's and Envoy's default)."""
    encoder, their_decoder = Encoder(), library_decoder()
    encoder.header_table_size = (1 << 32) - 1
    assert encoder.header_table_size == 4096
    for n in range(200):  # 200 fields of ~140 bytes each: 28 KB if the table kept them
        block = encoder.encode([(b"x-echo", b"%03d" % n + b"v" * 100)])
        assert their_decoder.decode(block, raw=True) == [(b"x-echo", b"%03d" % n + b"v" * 100)]
        assert encoder.table.size <= 4096
    assert not block.startswith(b"\x3f")  # no size update: the table never left 4096
    encoder.header_table_size = 100  # a smaller size is taken, and announced
    assert encoder.encode([(b"x-a", b"1")]).startswith(b"\x3f\x45")  # 100


def test_size_updates_send_the_smallest_then_the_last() -> None:
    encoder, their_decoder = Encoder(), library_decoder()
    their_decoder.decode(encoder.encode([(b"x-a", b"1"), (b"x-b", b"2")]))
    encoder.header_table_size = 30
    encoder.header_table_size = 4096
    encoder.header_table_size = 4096  # no change
    block = encoder.encode([(b"x-c", b"3")])
    assert block.startswith(b"\x3e\x3f\xe1\x1f")  # 30 (the table emptied), then 4096
    assert their_decoder.decode(block, raw=True) == [(b"x-c", b"3")]
    assert list(their_decoder.header_table.dynamic_entries) == [(b"x-c", b"3")]
    assert table_of(encoder.table) == ([(b"x-c", b"3")], 36)
    assert encoder.encode([(b"x-c", b"3")]) == b"\xbe"  # no update left to send


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_huffman_both_ways_as_hpack(data: bytes) -> None:
    coded = hpackcodec.huffman_encode(data)
    assert coded == HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode(data)
    assert hpackcodec.huffman_decode(coded, 0, len(coded)) == data


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=12) | st.binary(max_size=8).map(hpackcodec.huffman_encode))
def test_any_huffman_string_is_taken_or_refused_as_hpack_does(data: bytes) -> None:
    try:
        expected: bytes | None = decode_huffman(data)
    except HPACKDecodingError:
        expected = None
    if expected is None:
        with pytest.raises(HPACKDecodingError):
            hpackcodec.huffman_decode(data, 0, len(data))
    else:
        assert hpackcodec.huffman_decode(data, 0, len(data)) == expected


# -- malformed blocks ---------------------------------------------------------------------

#: a 4000-byte value, added to the table
FILL = b"\x40\x01x" + hpackcodec.encode_integer(4000, 7, 0) + b"a" * 4000
BIG = b"\x7f\x80\x80\x80\x80\x01"  # (a table index of 127 + 2**28, in the most bytes allowed)


@pytest.mark.parametrize(
    ("block", "error"),
    [
        (b"\xff", HPACKDecodingError),  # an integer with no byte after its full prefix
        (b"\xff\x80\x80", HPACKDecodingError),  # one cut after continuation bytes
        (b"\xff\x80\x80\x80\x80\x80\x01", HPACKDecodingError),  # 6 bytes after the prefix
        (b"\xff" + BIG[1:], InvalidTableIndexError),  # 5: taken, then past the table
        (b"\x80", InvalidTableIndexError),  # index 0
        (b"\xbe", InvalidTableIndexError),  # 62: the dynamic table is empty
        (b"\x7e\x01a", InvalidTableIndexError),  # a literal's name past the table
        (b"\x0f\x30\x01a", InvalidTableIndexError),  # same, 4-bit prefix (index 63)
        (b"\x40", HPACKDecodingError),  # a literal with nothing after
        (b"\x40\x05ab", HPACKDecodingError),  # a name shorter than its length
        (b"\x41", HPACKDecodingError),  # an indexed name and no value
        (b"\x41\x03ab", HPACKDecodingError),  # a value shorter than its length
        (b"\x41\x7f\x80\x80\x80\x80", HPACKDecodingError),  # a length cut short
        (b"\x41\x81\x18", HPACKDecodingError),  # Huffman "a" padded with 0 bits
        (b"\x41\x82\x1f\xff", HPACKDecodingError),  # "a" then 8 bits of padding
        (b"\x41\x84\xff\xff\xff\xff", HPACKDecodingError),  # EOS in the string
        (b"\x41\x85\x1f\xff\xff\xff\xff", HPACKDecodingError),  # "a" then EOS
        (b"\x3f\xe9\x26", InvalidTableSizeError),  # size update to 5000 > 4096
        (b"\x82\x20", HPACKDecodingError),  # size update after a field
        (b"\x20\x82\x3f\xe1\x1f", HPACKDecodingError),  # after a field, even if allowed
    ],
)
def test_malformed_blocks_are_refused_as_hpack_refuses_them(
    block: bytes, error: type[Exception]
) -> None:
    with pytest.raises(error) as ours:
        Decoder().decode(block, raw=True)
    with pytest.raises(error) as theirs:
        LibraryDecoder().decode(block, raw=True)
    assert isinstance(theirs.value, type(ours.value)) or isinstance(ours.value, type(theirs.value))


def test_a_shrunk_table_the_peer_did_not_shrink_is_refused() -> None:
    ours = Decoder()
    ours.decode(b"\x40\x01a\x01b")
    ours.max_allowed_table_size = 100
    with pytest.raises(InvalidTableSizeError):
        ours.decode(b"\x82")
    ours.decode(b"\x3f\x45\x82")  # a size update to 100 first: taken
    assert ours.header_table_size == 100


def test_header_list_limits_hold_against_an_hpack_bomb() -> None:
    """A 4 KB entry put in the table once, then named again and again: a few bytes on the
    wire that would inflate to megabytes."""
    bomb = FILL + b"\xbe" * 1000
    with pytest.raises(OversizedHeaderListError):
        Decoder().decode(bomb, raw=True)
    with pytest.raises(OversizedHeaderListError):
        LibraryDecoder().decode(bomb, raw=True)
    small = Decoder(100)
    assert small.decode(b"\x82\x84", raw=True) == [(b":method", b"GET"), (b":path", b"/")]
    with pytest.raises(OversizedHeaderListError):
        small.decode(b"\x82\x84\x86", raw=True)  # 3 x 32 bytes, and the fields


# -- h2 on it -----------------------------------------------------------------------------


def pair(install: bool) -> tuple[H2Connection, H2Connection]:
    """A client and a server h2 connection that have exchanged their prefaces, the server on
    this module's codec if ``install``."""
    client = H2Connection(H2Configuration(client_side=True, header_encoding=None))
    server = H2Connection(H2Configuration(client_side=False, header_encoding=None))
    if install:
        hpackcodec.install(server)
        assert isinstance(server.encoder, Encoder)
        assert isinstance(server.decoder, Decoder)
    client.initiate_connection()
    server.initiate_connection()
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    return client, server


REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"),
           (b":path", b"/p"), (b"content-type", b"application/grpc"),
           NeverIndexedHeaderTuple(b"authorization", b"Bearer x")]  # fmt: skip


def test_h2_sends_and_takes_headers_through_it() -> None:
    client, server = pair(install=True)
    for sid in (1, 3, 5):
        client.send_headers(sid, REQUEST, end_stream=True)
        [event] = [e for e in server.receive_data(client.data_to_send()) if
                   isinstance(e, RequestReceived)]  # fmt: skip
        assert event.headers == REQUEST
        assert isinstance(event.headers[-1], NeverIndexedHeaderTuple)
        server.send_headers(sid, [(b":status", b"200"), HeaderTuple(b"x-n", b"%d" % sid)])
        got = [e.headers for e in client.receive_data(server.data_to_send()) if
               isinstance(e, ResponseReceived)]  # fmt: skip
        assert got == [[(b":status", b"200"), (b"x-n", b"%d" % sid)]]


@pytest.mark.parametrize(
    ("block", "error", "code"),
    [
        (b"\xbe", ProtocolError, ErrorCodes.PROTOCOL_ERROR),
        (b"\x41\x84\xff\xff\xff\xff", ProtocolError, ErrorCodes.PROTOCOL_ERROR),
        (FILL + b"\xbe" * 40, DenialOfServiceError,
         ErrorCodes.ENHANCE_YOUR_CALM),
    ],
)  # fmt: skip
def test_a_bad_block_ends_the_connection_as_with_hpack(
    block: bytes, error: type[Exception], code: ErrorCodes
) -> None:
    frame = HeadersFrame(1)
    frame.data = block
    frame.flags.add("END_HEADERS")
    frame.flags.add("END_STREAM")
    sent = []
    for install in (False, True):
        client, server = pair(install)
        with pytest.raises(error):
            server.receive_data(frame.serialize())
        sent.append(server.data_to_send())
        [ended] = [e for e in client.receive_data(sent[-1]) if
                   isinstance(e, ConnectionTerminated)]  # fmt: skip
        assert ended.error_code == code
    assert sent[0] == sent[1]
