"""The admin port's rule for mutating calls, without sockets: every refusal and every allowed
shape."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from sidecar.admin.access import AdminCall, Refusal, is_loopback, refusal

#: what ``curl -X POST -H 'Content-Type: application/json' http://127.0.0.1:15000/drain`` sends
CURL = AdminCall(
    method="POST",
    peer="127.0.0.1",
    host="127.0.0.1:15000",
    origin=None,
    fetch_site=None,
    content_type="application/json",
    authorization=None,
)
TOKEN = "s3cret-admin"


def decide(admin_token: str = "", **changes: Any) -> Refusal | None:
    return refusal(replace(CURL, **changes), admin_token)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"body": b"{}"},
        {"body": b'{"reason": "deploy"}'},
        {"content_type": "application/json; charset=utf-8"},
        {"content_type": "Application/JSON"},
        {"peer": "::1", "host": "[::1]:15000"},
        {"peer": "::ffff:127.0.0.1"},  # a dual-stack listener sees IPv4 loopback like this
        {"peer": "127.0.0.2"},
        {"host": "localhost:15000"},
        {"host": "LOCALHOST"},
        {"host": "10.1.2.3:15000"},  # an IP literal cannot be rebound
        {"origin": "http://127.0.0.1:15000"},  # the port's own page
        {"origin": "http://localhost", "host": "localhost:80"},
        {"origin": "http://[::1]:15000", "host": "[::1]:15000", "peer": "::1"},
        {"fetch_site": "same-origin"},
        {"fetch_site": "none"},  # typed into the address bar, or curl
    ],
)
def test_same_origin_json_from_loopback_is_allowed(changes: dict[str, Any]) -> None:
    assert decide(**changes) is None


@pytest.mark.parametrize("method", ["GET", "HEAD", "OPTIONS"])
def test_reads_are_never_refused(method: str) -> None:
    assert (
        decide(
            method=method,
            peer="203.0.113.9",
            host="evil.example",
            origin="null",
            content_type=None,
            fetch_site="cross-site",
        )
        is None
    )


@pytest.mark.parametrize("method", ["POST", "PUT", "PATCH", "DELETE"])
def test_every_mutating_method_is_checked(method: str) -> None:
    assert decide(method=method, content_type="text/plain") is not None


@pytest.mark.parametrize(
    "peer", ["10.0.0.7", "192.168.1.20", "::ffff:10.0.0.7", "fe80::1%eth0", "", None]
)
def test_without_an_admin_token_other_peers_are_refused(peer: str | None) -> None:
    refused = decide(peer=peer)
    assert refused is not None
    assert refused.status == 403
    assert "not a loopback address" in refused.error
    assert "--admin-token" in refused.error


def test_the_admin_token_admits_any_peer_and_only_with_it() -> None:
    right = f"Bearer {TOKEN}"
    assert decide(TOKEN, peer="10.0.0.7", authorization=right) is None
    assert decide(TOKEN, authorization=f"bearer {TOKEN}") is None  # the scheme has no case
    for wrong, says in [
        (None, "needs Authorization: Bearer"),
        (f"Basic {TOKEN}", "needs Authorization: Bearer"),
        ("Bearer", "wrong admin token"),
        ("Bearer nope", "wrong admin token"),
        (f"Bearer {TOKEN}x", "wrong admin token"),
        (f"Bearer {TOKEN[:-1]}", "wrong admin token"),
        ("Bearer s3cret-adminé", "wrong admin token"),  # not ASCII: refused, no TypeError
    ]:
        refused = decide(TOKEN, authorization=wrong)
        assert refused is not None, wrong
        assert (refused.status, says in refused.error) == (401, True), (wrong, refused)
    # loopback is no excuse once a token is set
    assert decide(TOKEN, peer="127.0.0.1") == Refusal(
        401, "this call needs Authorization: Bearer <admin token>"
    )


@pytest.mark.parametrize(
    "origin",
    [
        "http://evil.example",
        "https://evil.example",
        "null",  # sandboxed frames, file: pages, redirects
        "http://127.0.0.1:15001",  # another port is another origin
        "https://127.0.0.1:15000",  # another scheme too
        "http://localhost:15000",  # another name as well
        "",
        "http://127.0.0.1:15000/path",
        "127.0.0.1:15000",
    ],
)
def test_a_foreign_origin_is_refused(origin: str) -> None:
    refused = decide(origin=origin)
    assert refused is not None
    assert refused.status == 403
    assert refused.error.startswith("cross-origin call refused: Origin")


@pytest.mark.parametrize("site", ["cross-site", "same-site", "Cross-Site"])
def test_sec_fetch_site_across_sites_is_refused(site: str) -> None:
    assert decide(fetch_site=site) == Refusal(
        403, f"cross-origin call refused (Sec-Fetch-Site: {site.lower()})"
    )


def test_a_browsers_no_preflight_post_is_refused_for_its_origin_first() -> None:
    """What a page on another site can send without asking: text/plain with its Origin."""
    refused = decide(origin="http://evil.example", content_type="text/plain", body=b"x")
    assert refused is not None
    assert refused.error.startswith("cross-origin call refused")


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (None, b""),
        ("text/plain", b"{}"),
        ("text/plain;charset=UTF-8", b""),
        ("application/x-www-form-urlencoded", b"a=1"),
        ("multipart/form-data; boundary=x", b""),
        ("application/jsonx", b"{}"),
    ],
)
def test_a_body_that_is_not_declared_json_is_refused(content_type: str | None, body: bytes) -> None:
    refused = decide(content_type=content_type, body=body)
    assert refused is not None
    assert refused.status == 403
    assert refused.error.startswith("Content-Type must be application/json")


@pytest.mark.parametrize("body", [b"x", b"{", b"drain=1", b"\xff\xfe{}", b"{}garbage"])
def test_a_json_content_type_with_a_body_that_is_not_json_is_refused(body: bytes) -> None:
    assert decide(body=body) == Refusal(403, "the body is not valid JSON")


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:15000",  # DNS rebinding: the attacker's name, pointed at 127.0.0.1
        "evil.example",
        "localhost.evil.example:15000",
        "sub.localhost:15000",
        "127.0.0.1.nip.io:15000",
        "",
        "127.0.0.1:port",
        "127.0.0.1:99999",
        "::1",  # unbracketed IPv6 is not a Host
        "[::1",
        "[::1]x",
    ],
)
def test_a_host_that_is_not_an_ip_or_localhost_is_refused(host: str) -> None:
    refused = decide(host=host)
    assert refused is not None
    assert refused.status == 403
    assert "is not an IP address or localhost" in refused.error


def test_a_missing_host_is_refused() -> None:
    assert decide(host=None) == Refusal(403, "a Host header is required")


def test_the_first_rule_broken_answers() -> None:
    """Host, then origin, then the caller, then the body: a rebinding page from afar with a
    form body hears about its Host."""
    everything_wrong: dict[str, Any] = {
        "host": "evil.example",
        "origin": "http://evil.example",
        "peer": "10.0.0.7",
        "content_type": "text/plain",
    }
    first = decide(**everything_wrong)
    assert first is not None
    assert "DNS rebinding" in first.error
    second = decide(**{**everything_wrong, "host": "127.0.0.1:15000"})
    assert second is not None
    assert "cross-origin" in second.error
    third = decide(**{**everything_wrong, "host": "127.0.0.1:15000", "origin": None})
    assert third is not None
    assert "loopback" in third.error


def test_messages_quote_at_most_80_characters_of_a_header() -> None:
    refused = decide(host="a" * 10_000)
    assert refused is not None
    assert len(refused.error) < 200


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.255.0.1", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", False),
        ("10.0.0.1", False),
        ("0.0.0.0", False),
        ("::", False),
        ("localhost", False),  # a peer is an address, never a name
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(address: str | None, loopback: bool) -> None:
    assert is_loopback(address) is loopback
