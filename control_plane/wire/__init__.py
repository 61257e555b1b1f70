"""The contract the control plane and the sidecars both speak.

Standard library only: the sidecar imports this package (and ``ring``, ``flags``) and nothing
else from the control plane. Modules:

    checks      names and values both sides validate (service names, ids, addresses ...)
    documents   frozen dataclasses whose field specs give both the parser and the JSON Schema
    policy      the per-service policy document
    table       instance registrations and the routing table
    stream      the push stream's messages
"""

from control_plane.wire.checks import (
    DEFAULT_WEIGHT,
    INSTANCE_ID,
    METADATA_KEY_MAX,
    METADATA_MAX_ENTRIES,
    METADATA_VALUE_MAX,
    PORT_RANGE,
    SERVICE_NAME,
    WEIGHT_RANGE,
    ZONE,
    WireError,
    check_address,
    check_instance_id,
    check_int,
    check_metadata,
    check_namespace,
    check_service_name,
    check_unicode,
    check_zone,
)
from control_plane.wire.documents import D, Spec, check_bounds, json_schema, parse, spec, to_json
from control_plane.wire.policy import (
    DEFAULT_POLICY,
    HASH_POLICIES,
    LB_POLICIES,
    RETRY_ON_EVENTS,
    Hedge,
    Outlier,
    Policy,
    RetryBudget,
    parse_policy,
)
from control_plane.wire.stream import (
    HEALTH,
    STREAM_PATH,
    Ack,
    Deregister,
    Heartbeat,
    Hello,
    Message,
    Nack,
    Welcome,
    decode,
    encode,
)
from control_plane.wire.table import (
    Endpoint,
    Registration,
    ServiceEntry,
    Table,
    default_instance_id,
    parse_table,
    table_message,
)

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_WEIGHT",
    "HASH_POLICIES",
    "HEALTH",
    "INSTANCE_ID",
    "LB_POLICIES",
    "METADATA_KEY_MAX",
    "METADATA_MAX_ENTRIES",
    "METADATA_VALUE_MAX",
    "PORT_RANGE",
    "RETRY_ON_EVENTS",
    "SERVICE_NAME",
    "STREAM_PATH",
    "WEIGHT_RANGE",
    "ZONE",
    "Ack",
    "D",
    "Deregister",
    "Endpoint",
    "Heartbeat",
    "Hedge",
    "Hello",
    "Message",
    "Nack",
    "Outlier",
    "Policy",
    "Registration",
    "RetryBudget",
    "ServiceEntry",
    "Spec",
    "Table",
    "Welcome",
    "WireError",
    "check_address",
    "check_bounds",
    "check_instance_id",
    "check_int",
    "check_metadata",
    "check_namespace",
    "check_service_name",
    "check_unicode",
    "check_zone",
    "decode",
    "default_instance_id",
    "encode",
    "json_schema",
    "parse",
    "parse_policy",
    "parse_table",
    "spec",
    "table_message",
    "to_json",
]
