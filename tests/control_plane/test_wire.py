"""The policy document: defaults, every field's validation, and names."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from control_plane import wire
from control_plane.wire import DEFAULT_POLICY, Policy, WireError, parse_policy, stream, to_json


def test_empty_document_is_all_defaults() -> None:
    policy = parse_policy({})
    assert policy == DEFAULT_POLICY
    assert policy.lb == "peak_ewma"
    assert policy.timeout_ms == 15_000
    assert policy.connect_timeout_ms == 1_000
    assert policy.retries == 1
    assert policy.retry_on == ("connect-failure", "reset", 502, 503, 504)
    assert policy.retry_budget == wire.RetryBudget(ratio=0.2, min_per_s=10)
    assert policy.max_requests == 1024
    assert policy.outlier == wire.Outlier(5, 30_000, 50)
    assert policy.panic_threshold == 50
    assert policy.slow_start_ms == 30_000
    assert policy.zone_aware is True
    assert policy.hedge is None
    assert policy.mtls == "permissive"
    assert policy.protocol == "http1"
    assert policy.allow_from == ("*",)
    assert policy.hash_balance_factor == 1.25


def test_full_document_round_trips() -> None:
    doc = {
        "lb": "ring_hash",
        "hash_on": "cookie:session",
        "hash_balance_factor": 1.5,
        "timeout_ms": 2000,
        "connect_timeout_ms": 200,
        "per_try_timeout_ms": 500,
        "stream_idle_timeout_ms": 0,
        "tunnel_idle_timeout_ms": 60_000,
        "retries": 3,
        "retry_on": ["reset", 503, "429"],
        "retry_budget": {"ratio": 0.5, "min_per_s": 1},
        "max_requests": 10,
        "max_pending": 5,
        "max_connections": 2,
        "max_retries": 0,
        "outlier": {
            "consecutive_failures": 0,
            "base_ejection_ms": 1,
            "max_ejection_percent": 100,
            "failure_rate_percent": 0,
            "failure_rate_min_requests": 3,
            "max_ejection_ms": 10,
        },
        "panic_threshold": 0,
        "slow_start_ms": 0,
        "zone_aware": False,
        "hedge": {"after_ms": 50},
        "protocol": "http2",
        "mtls": "strict",
        "allow_from": ["web", "orders"],
    }
    policy = parse_policy(doc)
    assert policy.retry_on == ("reset", 503, 429)  # status strings become numbers
    assert to_json(policy) == {**doc, "retry_on": ["reset", 503, 429]}
    assert parse_policy(to_json(policy)) == policy


@pytest.mark.parametrize(
    ("doc", "field", "says"),
    [
        ({"lb": "fastest"}, "lb", "must be one of round_robin"),
        ({"mtls": "on"}, "mtls", "must be one of permissive, strict"),
        ({"protocol": "h2"}, "protocol", "must be one of http1, http2, auto"),
        ({"allow_from": "web"}, "allow_from", "must be an array"),
        ({"allow_from": ["web", "web"]}, "allow_from[1]", "'web' is listed twice"),
        ({"allow_from": ["Web!"]}, "allow_from[0]", "must be a DNS label"),
        ({"allow_from": [f"s{i}" for i in range(257)]}, "allow_from", "at most 256"),
        ({"lb": 3}, "lb", "must be a string"),
        ({"lb": "maglev"}, "hash_on", "is required when lb is maglev"),
        ({"hash_on": "path"}, "hash_on", "applies only when lb is ring_hash or maglev"),
        ({"lb": "ring_hash", "hash_on": "header:"}, "hash_on", "is not of the form"),
        ({"lb": "ring_hash", "hash_on": "body"}, "hash_on", "is not of the form"),
        ({"hash_balance_factor": 0.9}, "hash_balance_factor", "must be from 1 to 100"),
        ({"hash_balance_factor": "1.5"}, "hash_balance_factor", "must be a number"),
        ({"timeout_ms": 0}, "timeout_ms", "must be from 1 to 3600000 milliseconds"),
        ({"timeout_ms": 1.5}, "timeout_ms", "must be an integer"),
        ({"timeout_ms": True}, "timeout_ms", "must be an integer, got a boolean"),
        ({"connect_timeout_ms": 60_001}, "connect_timeout_ms", "must be from 1 to 60000"),
        ({"timeout_ms": 500}, "connect_timeout_ms", "must not exceed timeout_ms"),
        ({"per_try_timeout_ms": 20_000}, "per_try_timeout_ms", "must not exceed timeout_ms"),
        (
            {"outlier": {"base_ejection_ms": 10, "max_ejection_ms": 5}},
            "outlier.base_ejection_ms",
            "must not exceed max_ejection_ms",
        ),
        ({"retries": -1}, "retries", "must be from 0 to 10"),
        ({"retries": 11}, "retries", "must be from 0 to 10"),
        ({"retry_on": "reset"}, "retry_on", "must be an array"),
        ({"retry_on": ["timeout"]}, "retry_on[0]", "must be connect-failure or reset"),
        ({"retry_on": [503, 200]}, "retry_on[1]", "a status 400-599"),
        ({"retry_on": [503, "503"]}, "retry_on[1]", "listed twice"),
        ({"retry_on": [True]}, "retry_on[0]", "must be connect-failure"),
        ({"retry_on": ["\u00b2"]}, "retry_on[0]", "must be connect-failure"),
        ({"retry_on": ["\u0665\u0660\u0662"]}, "retry_on[0]", "must be connect-failure"),
        ({"retry_on": ["0502"]}, "retry_on[0]", "must be connect-failure"),
        ({"retry_on": ["unavailabel"]}, "retry_on[0]", "a gRPC code (cancelled, deadline_"),
        ({"retry_on": ["not_found"]}, "retry_on[0]", "got 'not_found'"),
        ({"retry_on": ["unavailable", "UNAVAILABLE"]}, "retry_on[1]", "got 'UNAVAILABLE'"),
        (
            {"retry_on": ["resource_exhausted", "resource-exhausted"]},
            "retry_on[1]",
            "'resource_exhausted' is listed twice",
        ),
        ({"hash_balance_factor": 10**400}, "hash_balance_factor", "is too large"),
        ({"retry_budget": {"ratio": 10**400}}, "retry_budget.ratio", "is too large"),
        ({"timeout_ms": 10**400}, "timeout_ms", "must be from 1 to 3600000"),
        ({"retry_budget": {"ratio": 1.5}}, "retry_budget.ratio", "must be from 0 to 1"),
        ({"retry_budget": {"min_per_s": -1}}, "retry_budget.min_per_s", "must be from 0"),
        ({"retry_budget": {"burst": 1}}, "retry_budget.burst", "unknown key"),
        ({"retry_budget": 0.2}, "retry_budget", "must be an object"),
        ({"max_requests": 0}, "max_requests", "must be from 1 to 1000000"),
        ({"outlier": {"consecutive_failures": -1}}, "outlier.consecutive_failures", "from 0"),
        ({"outlier": {"base_ejection_ms": 0}}, "outlier.base_ejection_ms", "from 1"),
        ({"outlier": {"max_ejection_percent": 101}}, "outlier.max_ejection_percent", "to 100"),
        ({"outlier": {"interval": 1}}, "outlier.interval", "unknown key"),
        ({"panic_threshold": 101}, "panic_threshold", "must be from 0 to 100 %"),
        ({"slow_start_ms": -1}, "slow_start_ms", "must be from 0"),
        ({"zone_aware": "yes"}, "zone_aware", "must be true or false"),
        ({"zone_aware": 1}, "zone_aware", "must be true or false"),
        ({"hedge": "on"}, "hedge", 'must be "off" or {"after_ms": N}'),
        ({"hedge": {}}, "hedge.after_ms", "is required"),
        ({"hedge": {"after_ms": 0}}, "hedge.after_ms", "must be from 1"),
        ({"hedge": {"after_ms": 10, "max": 2}}, "hedge.max", "unknown key"),
        ({"hedge": {"after_ms": 15_000}}, "hedge.after_ms", "must be less than timeout_ms"),
        ({"retry": 2}, "retry", "unknown key; allowed keys: lb, hash_on"),
    ],
)
def test_invalid_documents_name_the_field(doc: dict[str, Any], field: str, says: str) -> None:
    with pytest.raises(WireError) as caught:
        parse_policy(doc)
    assert caught.value.field == field
    assert says in caught.value.message


@pytest.mark.parametrize("data", [[], "lb", 3, None])
def test_a_policy_must_be_an_object(data: Any) -> None:
    with pytest.raises(WireError, match="must be an object"):
        parse_policy(data)


@pytest.mark.parametrize("off", [None, False, "off"])
def test_hedge_off_spellings(off: Any) -> None:
    assert parse_policy({"hedge": off}).hedge is None


def test_documents_validate_themselves_when_built_directly() -> None:
    with pytest.raises(WireError, match="retries"):
        Policy(retries=50)
    with pytest.raises(WireError, match="ratio"):
        wire.RetryBudget(ratio=-0.1)


@pytest.mark.parametrize("name", ["a", "payments", "a-b-9", "x" * 63, "9lives"])
def test_valid_service_names(name: str) -> None:
    assert wire.check_service_name(name) == name


@pytest.mark.parametrize("name", ["", "-a", "a-", "A", "a_b", "a.b", "x" * 64, "ä"])
def test_invalid_service_names(name: str) -> None:
    with pytest.raises(WireError, match="DNS label"):
        wire.check_service_name(name)


@pytest.mark.parametrize(
    "address", ["10.0.0.1", "::1", "fe80::1", "catalog", "catalog.svc.cluster.local", "a-1.b."]
)
def test_valid_addresses(address: str) -> None:
    assert wire.check_address(address) == address


@pytest.mark.parametrize(
    "address", ["", "999.1.1.1", "a..b", "-a.com", "a_b", "x" * 254, "10.0.0.1:80", 7, None]
)
def test_invalid_addresses(address: Any) -> None:
    with pytest.raises(WireError, match="IP address or a hostname"):
        wire.check_address(address)


def test_json_schema_matches_the_parser_on_defaults() -> None:
    schema = wire.json_schema(Policy)
    assert schema["additionalProperties"] is False
    props = schema["properties"]
    assert set(props) == set(to_json(DEFAULT_POLICY))
    for key, value in to_json(DEFAULT_POLICY).items():
        assert props[key]["default"] == value, key
    assert props["timeout_ms"]["minimum"] == 1
    assert props["lb"]["enum"] == list(wire.LB_POLICIES)
    assert "milliseconds" in props["timeout_ms"]["description"]


policies: st.SearchStrategy[dict[str, Any]] = st.builds(
    dict,
    lb=st.sampled_from(["round_robin", "random", "least_request", "peak_ewma"]),
    timeout_ms=st.integers(1000, 3_600_000),
    connect_timeout_ms=st.integers(1, 1000),
    retries=st.integers(0, 10),
    retry_on=st.lists(st.sampled_from(["reset", "connect-failure", 500, 502, 429]), unique=True),
    retry_budget=st.fixed_dictionaries(
        {"ratio": st.floats(0, 1), "min_per_s": st.integers(0, 100)}
    ),
    zone_aware=st.booleans(),
    hedge=st.one_of(st.none(), st.builds(dict, after_ms=st.integers(1, 999))),
)


@given(policies)
def test_any_valid_policy_round_trips(doc: dict[str, Any]) -> None:
    policy = parse_policy(doc)
    assert parse_policy(to_json(policy)) == policy


def test_retry_on_names_grpc_codes_in_either_spelling() -> None:
    """The issue's spelling, and Envoy's hyphenated one, kept as the former."""
    doc = {"retry_on": ["unavailable", "deadline-exceeded", "resource_exhausted", 503]}
    policy = parse_policy(doc)
    assert policy.retry_on == ("unavailable", "deadline_exceeded", "resource_exhausted", 503)
    assert to_json(policy)["retry_on"] == list(policy.retry_on)
    every = parse_policy({"retry_on": list(wire.RETRY_ON_GRPC)})
    assert every.retry_on == (
        "cancelled",
        "deadline_exceeded",
        "internal",
        "resource_exhausted",
        "unavailable",
    )


@given(policies, st.lists(st.booleans(), min_size=0, max_size=4))
def test_a_pushed_table_leaves_defaults_unsaid_and_round_trips(
    doc: dict[str, Any], odd: list[bool]
) -> None:
    """The control plane's table message leaves out what a field's default says; the
    sidecar's parse gives back the very table."""
    endpoints = tuple(
        wire.Endpoint(
            address=f"10.0.0.{i + 1}", port=8080, instance=f"i{i}", weight=7, zone="b",
            draining=True, namespace="shop", tls=True,
        )
        if strange
        else wire.Endpoint(address=f"10.0.0.{i + 1}", port=8080, instance=f"i{i}")
        for i, strange in enumerate(odd)
    )  # fmt: skip
    table = wire.Table(
        services={
            "plain": wire.ServiceEntry(DEFAULT_POLICY, endpoints),
            "custom": wire.ServiceEntry(parse_policy(doc), endpoints),
            "empty": wire.ServiceEntry(),
        },
        version=3,
        epoch="e1",
        trust_domain="cluster.local",
    )
    text = wire.table_message(table)
    assert wire.decode(text) == table
    sent = json.loads(text)["services"]
    assert sent["plain"] == ({"endpoints": sent["plain"]["endpoints"]} if endpoints else {})
    for e, strange in zip(sent["plain"]["endpoints"] if endpoints else [], odd, strict=True):
        assert set(e) == (
            {"address", "port", "instance", "weight", "zone", "draining", "namespace", "tls"}
            if strange
            else {"address", "port", "instance"}
        )


def test_a_table_parsed_following_the_one_in_force_keeps_what_did_not_change() -> None:
    old = wire.parse_table(
        {
            "services": {
                "same": {"endpoints": [{"address": "10.0.0.1", "port": 80}]},
                "moved": {"endpoints": [{"address": "10.0.0.2", "port": 80}]},
                "custom": {"policy": {"retries": 3}},
            }
        }
    )
    doc = {
        "services": {
            "same": {"endpoints": [{"address": "10.0.0.1", "port": 80}]},
            "moved": {"endpoints": [{"address": "10.0.0.3", "port": 80}]},
            "added": {"policy": {"retries": 3}},
        }
    }
    with wire.following(old.services):
        new = wire.parse_table(doc)
    assert new.services["same"] is old.services["same"]
    assert new.services["moved"].endpoints == (wire.Endpoint("10.0.0.3", 80),)
    assert new.services["added"].policy is old.services["custom"].policy
    assert wire.parse_table(doc).services["same"] is not old.services["same"]  # not following


TABLE_BY_SERVICE = (
    '{"type":"table","services":{"a":{"endpoints":[{"address":"10.0.0.1","port":80}]},'
    '"b":{"policy":{"lb":"round_robin"}}},"version":9,"epoch":"e","built":1.5}'
)


def test_a_service_sent_again_in_the_same_json_is_not_parsed_again() -> None:
    """``following`` with the digests of the message that made the table in force: a
    service whose JSON comes again byte for byte is that table's entry, unparsed."""
    with wire.following({}) as first:
        old = wire.decode(TABLE_BY_SERVICE)
    assert isinstance(old, wire.Table)
    assert set(first.digests) == {"a", "b"}
    moved = TABLE_BY_SERVICE.replace("10.0.0.1", "10.0.0.2").replace('"version":9', '"version":10')
    with wire.following(old.services, first.digests) as second:
        new = wire.decode(moved)
    assert isinstance(new, wire.Table)
    assert new.services["b"] is old.services["b"]
    assert new.services["a"].endpoints == (wire.Endpoint("10.0.0.2", 80),)
    assert second.digests["b"] == first.digests["b"] != second.digests["a"]
    # unparsed indeed: digests passed with other services (which the caller must not do)
    # make the table take those services' entries
    with wire.following(new.services, first.digests):
        again = wire.decode(TABLE_BY_SERVICE)
    assert isinstance(again, wire.Table)
    assert again.services["a"] is new.services["a"]
    # a message read whole (here: not as the control plane writes it) makes no digests
    with wire.following(old.services, first.digests) as whole:
        wire.decode(" " + TABLE_BY_SERVICE)
    assert whole.digests == {}


@pytest.mark.parametrize(
    "text",
    [
        TABLE_BY_SERVICE,
        ' {"type":"table", "services" : {"a" : {} ,"b":null} ,"version":2 , "new":1}\n',
        '{"type":"table","services":{},"trust_domain":"cluster.local"}',
        '{"type":"table","services":{"a":{},"a":{"policy":{"retries":0}}}}',
    ],
)
def test_a_table_message_decoded_service_by_service_is_the_table_decoded_whole(
    text: str,
) -> None:
    """The control plane's table messages (``{"type":"table",`` first) are decoded one
    service at a time, the JSON of a large table never whole; the same table comes out."""
    whole = wire.decode(" " + text.strip())  # (not the control plane's start: read whole)
    assert stream._table_by_service(text.strip()) == whole
    assert wire.decode(text.strip()) == whole


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ('{"type":"table","services":{"a":{"endpoints":[{"port":0}]}}}', "address: is required"),
        ('{"type":"table","services":{"a":{}},"version":-1}', "version: must be"),
        ('{"type":"table","services":{"a":{}}', "not JSON"),
        ('{"type":"table","services":{"a":{}}}]', "not JSON"),
        ('{"type":"table","services":{"a" {}}}', "not JSON"),
        ('{"type":"table","services":[]}', "services: must be an object of services"),
        ('{"type":"table","version":1}', "services: is required"),
        ('{"type":"table","services":{"\\ud800":{}}}', "not valid Unicode"),
        ('{"type":"table","services":{"bad name":{}}}', "services.bad name"),
    ],
)
def test_a_table_message_wrong_anywhere_is_refused_as_a_whole_one_is(text: str, says: str) -> None:
    """Whatever the by-service decoding finds wrong, or does not take as it comes, is read
    whole, and refused with what the whole reading says."""
    assert stream._table_by_service(text) is None
    with pytest.raises(WireError) as e:
        wire.decode(text)
    assert says in str(e.value)


def test_a_later_type_or_services_counts_as_in_any_json_reading() -> None:
    """JSON's last duplicate wins: a second ``type`` or ``services`` is read whole."""
    retyped = '{"type":"table","services":{},"type":"ack","version":4}'
    assert stream._table_by_service(retyped) is None
    assert wire.decode(retyped) == wire.Ack(4)
    twice = '{"type":"table","services":{"a":{}},"services":{"b":{}}}'
    assert stream._table_by_service(twice) is None
    decoded = wire.decode(twice)
    assert isinstance(decoded, wire.Table)
    assert list(decoded.services) == ["b"]
