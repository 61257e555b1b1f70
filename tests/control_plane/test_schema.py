"""Parsing of REST bodies: strict JSON, registrations and patches."""

from __future__ import annotations

from typing import Any

import pytest

from control_plane import schema
from control_plane.errors import BadRequest


def test_strict_json_accepts_plain_documents() -> None:
    assert schema.decode_json(b'{"a": [1, 2.5, "x", null, true]}') == {
        "a": [1, 2.5, "x", None, True]
    }


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{", "malformed JSON"),
        (b'{"a": NaN}', "NaN is not JSON"),
        (b'{"a": Infinity}', "Infinity is not JSON"),
        (b'{"a": 1, "a": 2}', "duplicate key 'a'"),
        (b"\xff\xfe", "malformed JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
    ],
)
def test_strict_json_rejects(body: bytes, says: str) -> None:
    with pytest.raises(BadRequest, match=says):
        schema.decode_json(body)


def test_registration_defaults_and_id() -> None:
    reg = schema.document(schema.Registration, {"address": "10.0.0.7", "port": 8080})
    assert (reg.id, reg.zone, reg.weight, reg.metadata) == (None, None, None, None)
    assert reg.instance_id() == "10.0.0.7-8080"
    v6 = schema.document(schema.Registration, {"address": "fd00::7", "port": 80})
    assert v6.instance_id() == "fd00__7-80"


def test_default_ids_never_collide() -> None:
    addresses = ["1::2", "1:0::2", "1--2", "1-2", "fe80::1%eth0", "fe80--1.eth0", "10.0.0.1"]
    ids = {a: schema.default_instance_id(a, 80) for a in addresses}
    assert ids["1::2"] == ids["1:0::2"]  # one address, however it is written: one id
    assert len({ids[a] for a in addresses if a != "1:0::2"}) == len(addresses) - 1


def test_default_id_of_a_long_hostname_is_a_digest() -> None:
    host = ".".join(["a" * 60] * 4)
    reg = schema.document(schema.Registration, {"address": host, "port": 1})
    assert len(reg.instance_id()) == 32
    assert reg.instance_id() == schema.default_instance_id(host, 1)


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"port": 80}, "address", "is required"),
        ({"address": "10.0.0.1"}, "port", "is required"),
        ({"address": "10.0.0.1", "port": 0}, "port", "must be from 1 to 65535"),
        ({"address": "10.0.0.1", "port": 65536}, "port", "must be from 1 to 65535"),
        ({"address": "10.0.0.1", "port": "80"}, "port", "must be an integer"),
        ({"address": "not an address", "port": 80}, "address", "IP address or a hostname"),
        ({"address": "10.0.0.1", "port": 80, "id": "a/b"}, "id", "1-128 of"),
        ({"address": "10.0.0.1", "port": 80, "id": "x" * 129}, "id", "1-128 of"),
        ({"address": "10.0.0.1", "port": 80, "weight": 0}, "weight", "from 1 to 10000"),
        ({"address": "10.0.0.1", "port": 80, "weight": 10_001}, "weight", "from 1 to 10000"),
        ({"address": "10.0.0.1", "port": 80, "zone": "z" * 64}, "zone", "at most 63"),
        ({"address": "10.0.0.1", "port": 80, "zone": "a b"}, "zone", "at most 63"),
        ({"address": "10.0.0.1", "port": 80, "namespace": "Shop"}, "namespace", "a DNS label"),
        ({"address": "10.0.0.1", "port": 80, "namespace": "-x"}, "namespace", "a DNS label"),
        ({"address": "10.0.0.1", "port": 80, "namespace": 7}, "namespace", "a DNS label"),
        ({"address": "10.0.0.1", "port": 80, "metadata": []}, "metadata", "object of strings"),
        ({"address": "10.0.0.1", "port": 80, "metadata": {"a": 1}}, "metadata.a", "a string"),
        ({"address": "10.0.0.1", "port": 80, "metadata": {"": "x"}}, "metadata", "keys must be"),
        (
            {"address": "10.0.0.1", "port": 80, "metadata": {"k": "v" * 1025}},
            "metadata.k",
            "at most 1024",
        ),
        (
            {"address": "10.0.0.1", "port": 80, "metadata": {str(i): "" for i in range(65)}},
            "metadata",
            "has 65 entries; at most 64",
        ),
        ({"address": "10.0.0.1", "port": 80, "status": "healthy"}, "status", "unknown key"),
        ([], "(document)", "must be an object, got an array"),
    ],
)
def test_invalid_registrations(body: Any, field: str, says: str) -> None:
    with pytest.raises(BadRequest, match=says) as caught:
        schema.document(schema.Registration, body)
    assert caught.value.field == field


def test_null_means_not_given() -> None:
    reg = schema.document(
        schema.Registration, {"address": "h", "port": 1, "id": None, "weight": None}
    )
    assert reg.id is None
    assert reg.weight is None


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({}, "(body)", "nothing to change"),
        ({"status": "unhealthy"}, "status", "draining or back to healthy"),
        ({"weight": 0}, "weight", "from 1 to 10000"),
        ({"zone": "b"}, "zone", "unknown key"),
    ],
)
def test_invalid_patches(body: Any, field: str, says: str) -> None:
    with pytest.raises(BadRequest, match=says) as caught:
        schema.document(schema.InstancePatch, body)
    assert caught.value.field == field


@pytest.mark.parametrize(("name", "ok"), [("catalog", True), ("Catalog", False), ("a" * 64, False)])
def test_path_service_names(name: str, ok: bool) -> None:
    if ok:
        assert schema.service_name(name) == name
    else:
        with pytest.raises(BadRequest) as caught:
            schema.service_name(name)
        assert caught.value.field == "service"
