"""The key a hash policy takes from a request, and None when the request lacks it."""

from __future__ import annotations

import pytest

from sidecar.balancing.hashing import key_function
from sidecar.http.http1 import parse_request_head

HEADERS = [
    (b"Host", b"catalog"),
    (b"X-User", b"alice"),
    (b"Cookie", b"theme=dark; session=s-42"),
    (b"Cookie", b"late=1"),
]


@pytest.mark.parametrize(
    ("hash_on", "url", "key"),
    [
        ("header:x-user", b"/a", b"alice"),
        ("header:X-USER", b"/a", b"alice"),  # header names are case-insensitive
        ("header:x-tenant", b"/a", None),
        ("cookie:session", b"/a", b"s-42"),
        ("cookie:late", b"/a", b"1"),
        ("cookie:Session", b"/a", None),  # cookie names are not
        ("query:user", b"/a?x=1&user=bob%20b", b"bob b"),
        ("query:user", b"/a?user+id=1", None),
        ("query:user id", b"/a?user+id=7", b"7"),
        ("query:user", b"/a", None),
        ("path", b"/items/9?page=2", b"/items/9"),
        ("source_ip", b"/", b"10.1.2.3"),
    ],
)
def test_keys(hash_on: str, url: bytes, key: bytes | None) -> None:
    head = parse_request_head(b"GET", url, "1.1", HEADERS, True)
    key_of = key_function(hash_on)
    assert key_of is not None
    assert key_of(head, b"10.1.2.3") == key


def test_no_hash_on_no_key_function_and_unknown_kinds_refused() -> None:
    assert key_function(None) is None
    with pytest.raises(ValueError, match="unknown hash_on"):
        key_function("body:x")
