"""Names and values both sides validate the same way, and the one error they raise."""

from __future__ import annotations

import ipaddress
import re
from typing import Any


class WireError(ValueError):
    """A document is not valid; ``field`` is the dotted path of the offending key."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message

    def under(self, prefix: str) -> WireError:
        """The same error, its field path nested below ``prefix``."""
        return WireError(f"{prefix}.{self.field}" if prefix else self.field, self.message)


SERVICE_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
INSTANCE_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")


def check_service_name(name: str, field: str = "service") -> str:
    if not isinstance(name, str) or SERVICE_NAME.fullmatch(name) is None:
        raise WireError(
            field,
            "must be a DNS label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
        )
    return name


TRUST_DOMAIN_NAME = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?")


def check_trust_domain(trust_domain: Any, field: str = "trust_domain") -> str:
    """A SPIFFE trust domain (``cluster.local``): lower-case letters, digits, '.' and '-'."""
    if not isinstance(trust_domain, str) or TRUST_DOMAIN_NAME.fullmatch(trust_domain) is None:
        raise WireError(
            field,
            f"must be a trust domain of a-z, 0-9, '.' and '-', got {_json_type(trust_domain)}",
        )
    return trust_domain


def check_instance_id(instance_id: str, field: str = "id") -> str:
    if not isinstance(instance_id, str) or INSTANCE_ID.fullmatch(instance_id) is None:
        raise WireError(field, "must be 1-128 of A-Z, a-z, 0-9, '.', '_' and '-'")
    return instance_id


MAX_CSR_BYTES = 8192
"""bytes of a PEM certificate signing request at most (``stream.Csr``)"""
MAX_ROOTS = 8
"""root certificates a trust bundle holds at most (``table.Table``)"""
MAX_ROOT_BYTES = 16 * 1024
"""bytes of one PEM root certificate at most"""

PORT_RANGE = (1, 65535)
WEIGHT_RANGE = (1, 10_000)
DEFAULT_WEIGHT = 100
ZONE = re.compile(r"[A-Za-z0-9._-]{0,63}")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
#: an IPv6 zone id (``fe80::1%eth0``) names an interface: Linux caps those at 15 characters
IPV6_ZONE_ID = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def check_address(address: Any, field: str = "address") -> str:
    """An IP address (v4 or v6; a v6 zone id names an interface) or a DNS hostname."""
    if not isinstance(address, str):
        raise WireError(field, f"must be an IP address or a hostname, got {_json_type(address)}")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        host = address.removesuffix(".")
        labels = host.split(".")
        if (
            0 < len(host) <= 253
            and all(_HOST_LABEL.fullmatch(x) for x in labels)
            and not labels[-1].isdigit()  # 999.1.1.1 is a bad IP, not a hostname
        ):
            return address
        raise WireError(
            field, f"must be an IP address or a hostname, got {_json_type(address)}"
        ) from None
    zone = getattr(ip, "scope_id", None)
    if zone is not None and IPV6_ZONE_ID.fullmatch(zone) is None:
        raise WireError(field, "an IPv6 zone id must name an interface: 1-15 of A-Za-z0-9_.-")
    return address


def check_namespace(namespace: Any, field: str = "namespace") -> str:
    """A Kubernetes namespace (a DNS label), or "" for none."""
    if namespace == "":
        return ""
    return check_service_name(namespace, field)


def check_zone(zone: Any, field: str = "zone") -> str:
    if not isinstance(zone, str) or ZONE.fullmatch(zone) is None:
        raise WireError(field, "must be at most 63 of A-Z, a-z, 0-9, '.', '_' and '-'")
    return zone


METADATA_MAX_ENTRIES = 64
METADATA_KEY_MAX = 128
METADATA_VALUE_MAX = 1024


def check_metadata(metadata: object, field: str = "metadata") -> dict[str, str]:
    """String to string, at most 64 entries, keys 1-128 and values 0-1024 characters."""
    if not isinstance(metadata, dict):
        raise WireError(field, "must be an object of strings")
    if len(metadata) > METADATA_MAX_ENTRIES:
        raise WireError(field, f"has {len(metadata)} entries; at most {METADATA_MAX_ENTRIES}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not 1 <= len(key) <= METADATA_KEY_MAX:
            raise WireError(field, f"keys must be 1-{METADATA_KEY_MAX} characters")
        if not isinstance(value, str) or len(value) > METADATA_VALUE_MAX:
            raise WireError(
                f"{field}.{key}", f"must be a string of at most {METADATA_VALUE_MAX} characters"
            )
    return dict(metadata)


def check_int(value: Any, field: str, bounds: tuple[int, int]) -> int:
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise WireError(field, f"must be an integer from {lo} to {hi}, got {_json_type(value)}")
    return value


#: how JSON spells a UTF-16 surrogate; text without one cannot hold a lone surrogate
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def check_unicode(text: str | bytes, data: Any) -> None:
    """WireError naming the first string of ``data`` (decoded from the JSON ``text``) that is
    not valid Unicode: a lone surrogate, which a ``\\ud800`` escape can spell and which no
    UTF-8 encoder takes."""
    raw = text if isinstance(text, str) else text.decode("utf-8", "replace")
    if _SURROGATE_ESCAPE.search(raw) is None:
        return
    path = _lone_surrogate(data, "")
    if path is not None:
        raise WireError(path or "(document)", "is not valid Unicode (a lone surrogate)")


def _lone_surrogate(value: Any, path: str) -> str | None:
    if isinstance(value, str):
        return path if not _encodable(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if not _encodable(key):
                return where.encode("utf-8", "backslashreplace").decode()
            found = _lone_surrogate(item, where)
            if found is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{i}]")
            if found is not None:
                return found
    return None


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _json_type(value: Any) -> str:
    """How a JSON value is named in error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    if isinstance(value, str):
        return f"the string {value!r}"[:80]
    if isinstance(value, dict):
        return "an object"
    return "an array" if isinstance(value, list) else type(value).__name__
