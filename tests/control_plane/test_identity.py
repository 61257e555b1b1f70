"""What both sides speak of identities (issue 15): SPIFFE IDs, the CSR and certificate
messages, the table's trust bundle and its endpoints' TLS."""

from __future__ import annotations

import time
from typing import Any

import pytest

from control_plane.ca import Authority
from control_plane.wire import (
    Certificate,
    Csr,
    Hello,
    Registration,
    WireError,
    decode,
    encode,
    parse_table,
    table_message,
)
from control_plane.wire.identity import parse_spiffe_id, spiffe_id

ROOT = Authority.create(time.time()).pem()[0].decode()


@pytest.mark.parametrize(
    ("text", "parts"),
    [
        ("spiffe://cluster.local/ns/shop/svc/catalog", ("cluster.local", "shop", "catalog")),
        (spiffe_id("example.org", "", "web"), ("example.org", "default", "web")),
        ("spiffe://cluster.local/ns/shop/svc/Catalog", None),
        ("spiffe://cluster.local/ns/shop/svc/catalog/x", None),
        ("spiffe://Cluster/ns/shop/svc/catalog", None),
        ("spiffe://cluster.local/svc/catalog", None),
        ("https://cluster.local/ns/shop/svc/catalog", None),
        ("spiffe://cluster.local/ns/-shop/svc/catalog", None),
        ("", None),
    ],
)
def test_parse_spiffe_id(text: str, parts: tuple[str, str, str] | None) -> None:
    assert parse_spiffe_id(text) == parts


def test_csr_and_certificate_messages_round_trip() -> None:
    for message in (Csr("-----BEGIN CERTIFICATE REQUEST-----"), Certificate(chain="PEM")):
        assert decode(encode(message)) == message
    assert encode(Certificate(error="no")) == '{"type":"certificate","chain":"","error":"no"}'
    with pytest.raises(WireError, match="csr: must be a string"):
        decode('{"type": "csr", "csr": 7}')


def test_hello_says_whether_its_inbound_takes_tls() -> None:
    reg = Registration(address="10.0.0.1", port=80)
    assert Hello("n", "svc", reg).tls is False
    said = Hello("n", "svc", reg, tls=True)
    assert decode(encode(said)) == said


def _table(**extra: Any) -> dict[str, Any]:
    endpoint = {"address": "10.0.0.1", "port": 80, "tls": True}
    return {"services": {"svc": {"endpoints": [endpoint]}}, "version": 1, **extra}


def test_a_table_carries_the_trust_bundle_and_endpoints_that_take_tls() -> None:
    table = parse_table(_table(trust_domain="cluster.local", trust_bundle=[ROOT]))
    assert table.trust_bundle == (ROOT,)
    assert table.services["svc"].endpoints[0].tls is True
    assert parse_table(_table()).trust_bundle == ()  # none: no mesh TLS
    again = decode(table_message(table))
    assert again == table


@pytest.mark.parametrize(
    ("extra", "field", "says"),
    [
        ({"trust_bundle": ["junk"]}, "trust_bundle[0]", "is not a PEM certificate"),
        ({"trust_bundle": [ROOT] * 9}, "trust_bundle", "at most 8"),
        ({"trust_bundle": [ROOT + "x" * 17_000]}, "trust_bundle[0]", "over 16384 bytes"),
        ({"trust_bundle": ROOT}, "trust_bundle", "must be an array"),
        ({"trust_domain": "Not A Domain"}, "trust_domain", "must be a trust domain"),
    ],
)
def test_a_bad_trust_bundle_names_its_field(extra: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(WireError) as e:
        parse_table(_table(**extra))
    assert e.value.field == field
    assert says in e.value.message
